"""Session 33 (designed in LABEL_NOISE.md): label noise at k/B 1/4 at ftw's default
``geometry: adam-next`` on fresh seeds 94-107, then pooled with every earlier seed at that
default (session 31's 70-75, session 32's 90-93).

    python docs/benchmarks/s33-2026-12-03/s33_bars.py runs/quality-s33   (or …/raw/quality-s33)
"""

import argparse
import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
S31 = HERE.parent / "s31-2026-12-03" / "raw" / "quality-s31"
S32 = HERE.parent / "s32-2026-12-03" / "raw" / "quality-s32"
SETTING = "label-noise"


def _session32_reader():
    """Session 32's reading (the same table, so the two sessions read alike)."""
    spec = importlib.util.spec_from_file_location("s32_bars", HERE.parent / "s32-2026-12-03"
                                                  / "s32_bars.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    s32 = _session32_reader()
    mine = s32._runs(args.folder, SETTING)
    s32._read(mine, f"{SETTING}, this session's seeds")
    earlier = {**s32._runs(S31, SETTING), **s32._runs(S32, SETTING)}
    s32._read({**earlier, **mine},
              f"{SETTING} at adam-next, pooled with sessions 31-32 (seeds 70-75, 90-93)")


if __name__ == "__main__":
    main()
