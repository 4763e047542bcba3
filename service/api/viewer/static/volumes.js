// Volumes on the session's working grid: the API's packed mask, outlines, NIfTI for NiiVue.
import { NVImage } from "./vendor/niivue/niivue.js";

// Index of voxel (i, j, k) in NIfTI (Fortran) order, which NiiVue uses: i runs fastest.
const fortran = ([ni, nj]) => (i, j, k) => i + ni * (j + nj * k);

// `packbits-zlib`: base64 of zlib(numpy.packbits(mask.ravel(order="C"))), bits most
// significant first. Returns the 0/1 mask in NIfTI order.
export async function decodeMask(encoded) {
  const packed = Uint8Array.from(atob(encoded.data), (c) => c.charCodeAt(0));
  const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
  const bits = new Uint8Array(await new Response(stream).arrayBuffer());
  const [ni, nj, nk] = encoded.shape;
  const at = fortran(encoded.shape);
  const mask = new Uint8Array(ni * nj * nk);
  let c = 0;
  for (let i = 0; i < ni; i++) {
    for (let j = 0; j < nj; j++) {
      for (let k = 0; k < nk; k++, c++) {
        if (bits[c >> 3] & (128 >> (c & 7))) mask[at(i, j, k)] = 1;
      }
    }
  }
  return mask;
}

// Mask voxels with a face neighbour outside the mask (or on the grid's edge): its outline
// in every slice that cuts through the mask.
export function outline(mask, shape) {
  const [ni, nj, nk] = shape;
  const at = fortran(shape);
  const border = new Uint8Array(mask.length);
  const steps = [1, -1, ni, -ni, ni * nj, -ni * nj];
  for (let k = 0; k < nk; k++) {
    for (let j = 0; j < nj; j++) {
      for (let i = 0; i < ni; i++) {
        const n = at(i, j, k);
        if (!mask[n]) continue;
        const edge = i === 0 || j === 0 || k === 0 || i === ni - 1 || j === nj - 1 || k === nk - 1;
        border[n] = edge || steps.some((s) => !mask[n + s]) ? 1 : 0;
      }
    }
  }
  return border;
}

// Balls of `radius` voxels with `value` around grid voxels (the clicks, the suggestion).
export function paintBalls(target, shape, points, radius = 1.5) {
  const at = fortran(shape);
  const reach = Math.ceil(radius);
  for (const { voxel, value } of points) {
    const [ci, cj, ck] = voxel;
    for (let di = -reach; di <= reach; di++) {
      for (let dj = -reach; dj <= reach; dj++) {
        for (let dk = -reach; dk <= reach; dk++) {
          const [i, j, k] = [ci + di, cj + dj, ck + dk];
          const inside = i >= 0 && j >= 0 && k >= 0 && i < shape[0] && j < shape[1] && k < shape[2];
          if (inside && di * di + dj * dj + dk * dk <= radius * radius) target[at(i, j, k)] = value;
        }
      }
    }
  }
  return target;
}

// An NVImage of uint8 `data` (NIfTI order) placed by the working grid's affine.
export function gridImage(grid, data, name, colormap, opacity, calMax) {
  const s = grid.spacing_mm;
  const bytes = NVImage.createNiftiArray(grid.shape, [s, s, s], grid.affine.flat(), 2, data);
  return NVImage.new(bytes.buffer, `${name}.nii`, colormap, opacity, null, 0, calMax, true);
}

// A NIfTI answer of the API (e.g. the uncertainty) as an NVImage.
export function niftiImage(buffer, name, colormap, opacity, calMin, calMax) {
  return NVImage.new(buffer, `${name}.nii.gz`, colormap, opacity, null, calMin, calMax, true);
}

export const voxelCount = (mask) => mask.reduce((sum, v) => sum + (v ? 1 : 0), 0);
