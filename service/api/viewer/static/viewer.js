// The viewer page: NiiVue for the images, the service's public HTTP API for everything else.
import { DRAG_MODE, Niivue, NVImage, SHOW_RENDER } from "./vendor/niivue/niivue.js";
import { Api, ApiError } from "./api.js";
import { decodeMask, gridImage, niftiImage, outline, paintBalls, voxelCount } from "./volumes.js";
import { cacheImages, cachedImages } from "./cache.js";

const $ = (id) => document.getElementById(id);
const api = new Api(() => $("api-key").value.trim());
const nv = new Niivue({
  backColor: [0, 0, 0, 1],
  dragMode: DRAG_MODE.none,
  multiplanarShowRender: SHOW_RENDER.NEVER,
  crosshairColor: [0.3, 0.8, 1, 0.7],
  isColorbar: false,
  isNearestInterpolation: true, // labels stay labels when NiiVue resamples the overlays
});
// One annotation overlay on the working grid: the mask, the clicks and the suggested click.
const MARK = { mask: 1, foreground: 2, background: 3, suggestion: 4 };
// value v of 0..4 sits at 255 * v / 4 of the colour map
nv.addColormap("icr-annotation", {
  R: [0, 255, 60, 70, 255], G: [0, 40, 230, 150, 230], B: [0, 40, 60, 255, 0],
  A: [0, 255, 255, 255, 255], I: [0, 64, 128, 191, 255],
});

const state = {
  ct: null, pet: null, // NVImages of the chosen (or cached) files
  centre: null, // world mm chosen before a session exists
  session: null, // { id, grid, version, clicks }
  mask: null, // the current mask, NIfTI order
  suggestion: null, // { label, voxel, world_mm } from the last result
  members: 0,
  overlays: { annotation: null, uncertainty: null, blank: null },
  mode: "foreground",
  busy: false,
  timings: [], // per click: { roundTripMs, overlayMs }
};

// Move the crosshair to `mm` (world) and answer where it is drawn, in CSS pixels of the page,
// per view tile. The J key uses it for the suggestion; browser tests use it to click a point.
function focus(mm) {
  nv.scene.crosshairPos = nv.mm2frac(mm);
  nv.drawScene();
  const rect = $("view").getBoundingClientRect();
  const dpr = nv.uiData.dpr || 1;
  const position = nv.frac2canvasPos(nv.scene.crosshairPos);
  return position ? { x: rect.left + position[0] / dpr, y: rect.top + position[1] / dpr } : null;
}
window.icrViewer = { state, focus }; // for the browser tests and the console

// -- status and controls ----------------------------------------------------------------
function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function refreshControls() {
  const files = $("ct-file").files.length > 0 && $("pet-file").files.length > 0;
  const s = state.session;
  $("create").disabled = state.busy || !files;
  $("undo").disabled = state.busy || !s || s.clicks.length === 0;
  $("download").disabled = state.busy || !s;
  $("clear-centre").hidden = !state.centre;
  $("centre").textContent = state.centre ? `${fmt(state.centre)} mm` : "found by the service on PET/CT";
  for (const label of ["foreground", "background"]) $(`mode-${label}`).classList.toggle("active", state.mode === label);
}

async function run(task) {
  if (state.busy) return;
  state.busy = true;
  setStatus("busy");
  refreshControls();
  try {
    await task();
    setStatus("idle");
  } catch (error) {
    setStatus(error instanceof ApiError ? error.message : `Error: ${error.message}`, true);
  } finally {
    state.busy = false;
    $("progress").hidden = true;
    $("progress-text").textContent = "";
    refreshControls();
  }
}

const fmt = (v) => Array.from(v, (x) => x.toFixed(1)).join(", ");

// -- the scene: background CT, PET, disagreement, mask, click marks ---------------------------
async function rebuildScene() {
  const s = state.session;
  let background = state.ct;
  if (!background && s) {
    state.overlays.blank ??= await gridImage(s.window, new Uint8Array(s.window.shape.reduce((a, b) => a * b)), "blank", "gray", 1, 1);
    background = state.overlays.blank;
  }
  // the volumes in drawing order, set at once: NiiVue recomposes every layer on each update
  const volumes = [background, state.pet, state.overlays.uncertainty, state.overlays.annotation].filter(Boolean);
  nv.volumes = volumes;
  nv.back = volumes[0] || null;
  nv.overlays = volumes.slice(1);
  applyWindows();
}

function applyWindows() {
  if (state.ct) [state.ct.cal_min, state.ct.cal_max] = $("ct-window").value.split(",").map(Number);
  if (state.pet) {
    state.pet.cal_min = Number($("suv-min").value);
    state.pet.cal_max = Number($("suv-max").value);
    state.pet.opacity = Number($("pet-opacity").value);
  }
  if (nv.volumes.length) nv.updateGLVolume();
}

// the annotation's voxels on the current window: the mask (filled or its outline), then the click
// and suggestion balls (their voxels are on the session lattice: the window starts at its offset)
function annotation() {
  const { window, clicks } = state.session;
  const style = $("mask-style").value;
  const values = new Uint8Array(state.mask.length);
  if (style !== "off") values.set(style === "outline" ? outline(state.mask, window.shape) : state.mask);
  const local = (voxel) => voxel.map((v, axis) => v - window.offset[axis]);
  const points = clicks.map((c) => ({ voxel: local(c.voxel), value: MARK[c.label] }));
  if (state.suggestion) points.push({ voxel: local(state.suggestion.voxel), value: MARK.suggestion });
  return paintBalls(values, window.shape, points);
}

// one NiiVue update for the annotation (and the disagreement, when shown): each update
// recomposes every layer, which is what a click costs the browser
async function showOverlays(disagreement = null) {
  const { overlays } = state;
  let rebuild = !overlays.annotation;
  if (rebuild) overlays.annotation = await gridImage(state.session.window, annotation(), "annotation", "icr-annotation", 1, 4);
  else overlays.annotation.img.set(annotation());
  overlays.annotation.opacity = $("mask-style").value === "fill" ? 0.5 : 1;
  if (disagreement && overlays.uncertainty) overlays.uncertainty.img.set(disagreement.img);
  else if (disagreement) [overlays.uncertainty, rebuild] = [disagreement, true];
  if (rebuild) await rebuildScene();
  else nv.updateGLVolume();
}

// members voting foreground -> disagreement: 0 where all agree, up to members / 2
async function loadDisagreement() {
  const s = state.session;
  const image = await niftiImage(await api.bytes(`/v1/sessions/${s.id}/uncertainty`), "uncertainty", "violet", 0.6, 0, 1);
  const members = state.members || Math.max(...image.img);
  image.img = Uint8Array.from(image.img, (v) => Math.min(v, members - v));
  image.cal_min = 0;
  image.cal_max = Math.max(1, Math.floor(members / 2));
  return image;
}

async function toggleUncertainty() {
  if (!state.session) return;
  state.overlays.uncertainty = $("show-uncertainty").checked ? await loadDisagreement() : null;
  await rebuildScene();
}

// -- results of the API ---------------------------------------------------------------------
async function applyResult(result) {
  const s = state.session;
  if (s.window && String(s.window.offset) !== String(result.window.offset)) {
    state.overlays = { annotation: null, uncertainty: null, blank: null }; // the window moved: new overlays
  }
  s.window = result.window;
  s.version = result.version;
  s.clicks = result.clicks;
  state.mask = await decodeMask(result.mask);
  const uncertainty = result.uncertainty;
  state.suggestion = uncertainty ? uncertainty.suggested_click : null;
  state.members = uncertainty ? uncertainty.members : state.members;
  $("uncertain").textContent = uncertainty ? uncertainty.uncertain_ml.toFixed(2) : "-";
  showSession(result.summary.volume_ml);
  await showOverlays($("show-uncertainty").checked ? await loadDisagreement() : null);
}

function showSession(volumeMl) {
  const s = state.session;
  $("version").textContent = String(s.version);
  $("volume").textContent = volumeMl.toFixed(2);
  const list = $("clicks");
  list.replaceChildren(
    ...s.clicks.map((c) => {
      const item = document.createElement("li");
      item.className = c.label;
      item.textContent = `${c.label} at ${fmt(c.world_mm)} mm`;
      return item;
    }),
  );
  const hint = $("suggestion");
  hint.hidden = !state.suggestion;
  if (state.suggestion) {
    const g = state.suggestion;
    hint.textContent = `Suggested next click: ${g.label} at ${fmt(g.world_mm)} mm (yellow). J: go there, A: accept.`;
  }
}

// -- user actions ------------------------------------------------------------------------
async function loadImages(ct, pet) {
  state.ct = await NVImage.loadFromFile({ file: ct, name: ct.name, colormap: "gray" });
  state.pet = await NVImage.loadFromFile({ file: pet, name: pet.name, colormap: "hot", opacity: 0.5 });
  $("suv-max").value = Math.max(2, Math.min(10, Math.ceil(state.pet.global_max || 10)));
  await rebuildScene();
}

function chooseFiles() {
  const ct = $("ct-file").files[0];
  const pet = $("pet-file").files[0];
  refreshControls();
  if (!ct || !pet) return;
  if ([ct, pet].some((file) => file.name.toLowerCase().endsWith(".zip"))) {
    state.ct = state.pet = null; // a DICOM zip: the service reads it, NiiVue's preview cannot
    return;
  }
  run(async () => {
    try {
      await loadImages(ct, pet);
    } catch (error) {
      state.ct = state.pet = null;
      throw new Error(`the chosen files cannot be shown (${error.message || error}); the service will say why on Create`);
    }
  });
}

async function createSession() {
  const ct = $("ct-file").files[0];
  const pet = $("pet-file").files[0];
  await run(async () => {
    $("progress").hidden = false;
    const progress = (stage, fraction) => {
      $("progress").value = fraction;
      $("progress-text").textContent = stage === "uploading" ? `uploading ${Math.round(fraction * 100)} %` : "computing the initial mask";
    };
    progress("uploading", 0);
    const result = await api.createSession(ct, pet, state.centre, progress);
    state.session = { id: result.id, grid: result.grid, version: result.version, clicks: [] };
    state.overlays = { annotation: null, uncertainty: null, blank: null };
    state.centre = null;
    history.replaceState(null, "", `#session=${result.id}`);
    cacheImages(result.id, ct, pet).catch(() => {}); // for resuming after a reload; optional
    await applyResult(result);
  });
}

async function sendClick(click) {
  const s = state.session;
  await run(async () => {
    const started = performance.now();
    const result = await api.click(s.id, s.version, click);
    const answered = performance.now();
    await applyResult(result);
    nv.gl.finish(); // the new overlay is drawn on the canvas
    const timing = { roundTripMs: answered - started, overlayMs: performance.now() - started };
    state.timings.push(timing);
    $("round-trip").textContent = `${Math.round(timing.roundTripMs)} (drawn at ${Math.round(timing.overlayMs)})`;
  });
}

async function undo() {
  const s = state.session;
  if (!s || s.clicks.length === 0) return;
  await run(async () => applyResult(await api.undo(s.id, s.version)));
}

async function download() {
  const s = state.session;
  const format = $("download-format").value;
  await run(async () => {
    const query = format === "nifti" ? "space=original" : `format=${format}`;
    try {
      const { blob, name } = await api.blob(`/v1/sessions/${s.id}/mask?${query}`);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = name;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    } catch (error) {
      if (format !== "nifti" && error instanceof ApiError && [409, 422].includes(error.status)) {
        $("download-format").querySelector(`option[value="${format}"]`).remove(); // not for this session
      }
      throw error;
    }
  });
}

async function resume(id) {
  await run(async () => {
    const session = await api.session(id);
    const image = await niftiImage(await api.bytes(`/v1/sessions/${id}/mask?space=working`), "mask", "red", 1, 0, 1);
    state.session = { id, grid: session.grid, window: session.window, version: session.version, clicks: session.clicks };
    state.overlays = { annotation: null, uncertainty: null, blank: null };
    state.mask = Uint8Array.from(image.img);
    const files = await cachedImages(id).catch(() => null);
    if (files) {
      state.ct = await NVImage.loadFromFile({ file: files.ct, name: files.ct.name, colormap: "gray" });
      state.pet = await NVImage.loadFromFile({ file: files.pet, name: files.pet.name, colormap: "hot", opacity: 0.5 });
    }
    showSession((voxelCount(state.mask) * session.window.spacing_mm ** 3) / 1000);
    await showOverlays($("show-uncertainty").checked ? await loadDisagreement() : null);
  });
}

// -- the canvas: a click refines (or, before a session, places the centre) ----------------------
function worldAt(event) {
  const rect = $("view").getBoundingClientRect();
  const dpr = nv.uiData.dpr || 1;
  const frac = nv.canvasPos2frac([(event.clientX - rect.left) * dpr, (event.clientY - rect.top) * dpr]);
  if (!nv.volumes.length || frac[0] < 0 || frac[1] < 0 || frac[2] < 0) return null;
  const mm = nv.frac2mm(frac);
  return [mm[0], mm[1], mm[2]];
}

function valueAt(image, mm) {
  if (!image) return null;
  const [i, j, k] = Array.from(image.mm2vox(mm), Math.round);
  const [, ni, nj, nk] = image.hdr.dims;
  if (i < 0 || j < 0 || k < 0 || i >= ni || j >= nj || k >= nk) return null;
  return image.getValue(i, j, k);
}

function describe(mm) {
  const hu = valueAt(state.ct, mm);
  const suv = valueAt(state.pet, mm);
  const parts = [`${fmt(mm)} mm`];
  if (hu !== null) parts.push(`${Math.round(hu)} HU`);
  if (suv !== null) parts.push(`SUV ${suv.toFixed(2)}`);
  return parts.join(" · ");
}

let pressed = null;
function onPointerDown(event) {
  pressed = { x: event.clientX, y: event.clientY, other: event.button === 2 || event.shiftKey };
}

function onPointerUp(event) {
  const press = pressed;
  pressed = null;
  if (!press || Math.hypot(event.clientX - press.x, event.clientY - press.y) > 4) return; // a drag
  const mm = worldAt(event);
  if (!mm || state.busy) return;
  if (!state.session) {
    state.centre = mm;
    refreshControls();
    return;
  }
  const label = press.other === (state.mode === "foreground") ? "background" : "foreground";
  sendClick({ label, world_mm: mm });
}

function onKey(event) {
  if (event.target.closest("select, textarea, input[type=text], input[type=password], input[type=number]")) return;
  const key = event.key.toLowerCase();
  if (key === "f") state.mode = "foreground";
  else if (key === "b") state.mode = "background";
  else if (key === "u" || (key === "z" && (event.ctrlKey || event.metaKey))) undo();
  else if (key === "a" && state.suggestion && state.session) {
    const { label, voxel } = state.suggestion;
    sendClick({ label, voxel });
  } else return;
  event.preventDefault();
  refreshControls();
}

// -- wiring ------------------------------------------------------------------------------
async function main() {
  const view = $("view");
  await nv.attachToCanvas(view);
  nv.onLocationChange = (data) => {
    if (data && data.mm) $("crosshair").textContent = describe(Array.from(data.mm).slice(0, 3));
  };
  view.addEventListener("pointerdown", onPointerDown);
  view.addEventListener("pointerup", onPointerUp);
  view.addEventListener("contextmenu", (event) => event.preventDefault());
  view.addEventListener("mousemove", (event) => {
    const mm = worldAt(event);
    $("cursor").textContent = mm ? describe(mm) : "-";
  });
  document.addEventListener("keydown", onKey);
  for (const button of document.querySelectorAll("#layouts button")) {
    button.addEventListener("click", () => {
      nv.setSliceType(Number(button.dataset.layout));
      for (const other of document.querySelectorAll("#layouts button")) other.classList.toggle("active", other === button);
    });
  }
  $("api-key").value = sessionStorage.getItem("icr-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("icr-api-key", $("api-key").value.trim()));
  $("ct-file").addEventListener("change", chooseFiles);
  $("pet-file").addEventListener("change", chooseFiles);
  $("create").addEventListener("click", createSession);
  $("clear-centre").addEventListener("click", () => { state.centre = null; refreshControls(); });
  $("mode-foreground").addEventListener("click", () => { state.mode = "foreground"; refreshControls(); });
  $("mode-background").addEventListener("click", () => { state.mode = "background"; refreshControls(); });
  $("undo").addEventListener("click", undo);
  $("download").addEventListener("click", download);
  for (const id of ["ct-window", "suv-min", "suv-max", "pet-opacity"]) $(id).addEventListener("input", applyWindows);
  $("mask-style").addEventListener("change", () => state.mask && showOverlays());
  $("show-uncertainty").addEventListener("change", () => run(toggleUncertainty));
  for (const format of await api.maskFormats()) {
    if (format === "nifti") continue;
    const option = new Option(format === "dicom-seg" ? "DICOM-SEG" : format.toUpperCase(), format);
    $("download-format").append(option);
  }
  refreshControls();
  const id = new URLSearchParams(location.hash.slice(1)).get("session");
  if (id) await resume(id);
}

main().catch((error) => setStatus(`Error: ${error.message}`, true));
