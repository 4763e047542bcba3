"""Write wide-variety phantoms with some of the variety's departures put back to the classic draw.

A probe for which departure of ``icr phantoms --variety wide`` moves what the networks learn:
case for case the same draws as ``--variety wide`` (same seed, same anatomy, same variety
stream), except the named :class:`service.science.phantoms.Variety` fields, which keep the
classic generator's value (``Variety()``'s default: None fields fall back to the classic draw).

    python docs/results/wide_without.py OUT -n 40 --seed 5 --classic suv_peak pet_fwhm_mm
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from service.science.phantoms import Variety, case_seed, draw_variety, make_case, save_case

FIELDS = [field.name for field in dataclasses.fields(Variety)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("-n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--classic", nargs="+", choices=FIELDS, required=True,
                        help="Variety fields that keep the classic generator's value")
    parser.add_argument("--tag", help="the case ids' tag (phantom_<tag>_s<seed>_<index>); default wide-no-<fields>")
    args = parser.parse_args()
    classic = Variety()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "wide-no-" + "-".join(name.replace("_", "") for name in args.classic)
    for index in range(args.n):
        seed = case_seed(args.seed, index)
        variety = dataclasses.replace(draw_variety(seed, "wide"),
                                      **{name: getattr(classic, name) for name in args.classic})
        case_id = f"phantom_{tag}_s{args.seed}_{index:03d}"
        save_case(make_case(seed, variety=variety), args.out, case_id)
        print(case_id, variety)


if __name__ == "__main__":
    main()
