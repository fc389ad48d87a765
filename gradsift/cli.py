"""The ``gradsift`` command: run, compare, report, demo, data build."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from gradsift.config import ConfigError, load_config
from gradsift.recipe import compare


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.r=16 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradsift",
        description="Online, optimizer-aware data selection for LLM fine-tuning.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the same flags after the subcommand (`gradsift compare ... --quiet`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or tables")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kwargs: object) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("run", help="fine-tune on a stream with one selection method")
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="run directory")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue a stopped run")

    p = sub.add_parser("compare", help="several methods and seeds under one budget, + report")
    _add_config_args(p)
    p.add_argument("--methods", default="ftw,random,greats",
                   help="comma-separated selection methods, each trained with the same budget "
                        "(default: ftw,random,greats; all: " + ", ".join(_method_names()) + ")")
    p.add_argument("--seeds", default="0",
                   help="comma-separated seeds; a seed fixes the LoRA initialisation, the "
                        "target draws and the selector's randomness, the same for every method "
                        "(the stream is read in file order) (default: 0)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("report", help="rebuild the report of a run or compare directory")
    p.add_argument("dir", type=Path)

    p = sub.add_parser("demo", help="the make-demo job: build data, compare ftw/random/greats")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("config", help="the shipped example configs: list, copy, validate")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("ls", help="list the shipped configs")
    c = config_sub.add_parser("cp", help="copy a shipped config to a file to edit")
    c.add_argument("name", help="a name from `gradsift config ls`")
    c.add_argument("dest", type=Path)
    c = config_sub.add_parser("validate", help="check a config file (keys, types, ranges, "
                              "method options, data files)")
    c.add_argument("file", type=Path)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    b = data_sub.add_parser("build", help="build stream.jsonl and target.jsonl from packaged text")
    b.add_argument("--target", required=True, help="source used as the target set")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sources", help="comma-separated sources (default: all available)")
    b.add_argument("--n-stream", type=int, default=10_000, help="records in the stream")
    b.add_argument("--n-target", type=int, default=200, help="records in the target set")
    b.add_argument("--noise-rate", type=float, default=0.25,
                   help="share of wrong answers among the stream's arithmetic records")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from gradsift.engine import TrainingDiverged
    from gradsift.recipe import Interrupted

    try:
        return _dispatch(args, parser)
    except Interrupted as e:
        print(f"gradsift: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print("gradsift: aborted without a checkpoint; a resume continues from the last one",
              file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"gradsift: error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, ModuleNotFoundError) as e:
        print(f"gradsift: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gradsift: error: {_os_error_message(e, args)}", file=sys.stderr)
        return 2


def _os_error_message(e: OSError, args: argparse.Namespace) -> str:
    """One line for a file-system error: what failed, and what to do about it."""
    if isinstance(e, FileNotFoundError | FileExistsError) and e.filename is None:
        return str(e)  # gradsift's own message
    what = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    out = getattr(args, "resume", None) or getattr(args, "out", None)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{what}: free some disk space, then continue with "
                + (f"`gradsift run --resume {out}`" if args.command == "run" and out
                   else "the same command"))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: gradsift cannot write there; choose a writable --out folder"
    return what


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "run":
        from gradsift.recipe import resume_run, run_config

        if args.resume is not None:
            summary = resume_run(args.resume, quiet=args.quiet)
        else:
            if args.out is None:
                parser.error("run needs --out DIR (or --resume DIR)")
            summary = run_config(load_config(args.config, args.overrides), args.out,
                                 quiet=args.quiet)
        if not args.quiet:
            print(f"final target loss {summary['final_target_loss']:.4f} after "
                  f"{summary['steps']} steps, {summary['trained_samples']} samples")
            if summary["skipped_records"]:
                print(f"skipped records: {summary['skipped_records']} (see the log for each)")
        return 0
    if args.command == "compare":
        config = load_config(args.config, args.overrides)
        compare(config, _split(args.methods), [int(s) for s in _split(args.seeds)], args.out,
                quiet=args.quiet)
        return 0
    if args.command == "report":
        from gradsift.report import is_compare_dir, markdown_table, report

        path = report(args.dir)
        if is_compare_dir(args.dir) and not args.quiet:
            print(markdown_table(json.loads((args.dir / "summary.json").read_text())))
        print(f"report: {path}")
        return 0
    if args.command == "demo":
        from gradsift.demo import run_demo

        run_demo(args.out, overrides=args.overrides, quiet=args.quiet)
        return 0
    if args.command == "config":
        return _config_command(args)
    if args.command == "data":
        from gradsift.sources import build_stream

        manifest = build_stream(args.target, args.out, seed=args.seed, n_stream=args.n_stream,
                                n_target=args.n_target, noise_rate=args.noise_rate,
                                sources=_split(args.sources) if args.sources else None)
        print(f"wrote {args.out / 'stream.jsonl'} and {args.out / 'target.jsonl'} "
              f"(target source: {manifest['target']}, seed {manifest['seed']})")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


CONFIGS = Path(__file__).parent / "configs"


def _config_command(args: argparse.Namespace) -> int:
    """``gradsift config ls | cp NAME DEST | validate FILE`` (as ``tune ls/cp/validate``)."""
    if args.config_command == "ls":
        for path in sorted(CONFIGS.glob("*.yaml")):
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"{path.name:<12} {first}")
        return 0
    if args.config_command == "cp":
        name = args.name if args.name.endswith(".yaml") else f"{args.name}.yaml"
        source = CONFIGS / name
        if not source.is_file():
            raise ConfigError(f"no shipped config {args.name!r}; `gradsift config ls` lists them")
        if args.dest.exists():
            raise FileExistsError(f"{args.dest} exists: gradsift does not write over files")
        args.dest.parent.mkdir(parents=True, exist_ok=True)
        args.dest.write_bytes(source.read_bytes())
        print(f"wrote {args.dest}; edit `stream` and `target`, then "
              f"`gradsift config validate {args.dest}`")
        return 0
    from gradsift.select import get_selector

    config = load_config(args.file, args.overrides)
    from gradsift.recipe import method_options

    get_selector(config.method, **method_options(config))  # names a bad method or option
    missing = [f"{key}: {value}" for key, value in (("stream", config.stream),
                                                   ("target", config.target))
               if not value or not Path(value).is_file()]
    if missing:
        raise ConfigError(f"{args.file}: data file(s) not found: {'; '.join(missing)}")
    e = config.engine
    print(f"ok: {args.file}: model {config.model}, "
          f"{'LoRA r=' + str(config.lora.r) if config.lora else 'full fine-tuning'}, method "
          f"{config.method}, B={e.candidates_per_step}, k={e.budget_per_step}, "
          f"{config.steps} steps")
    return 0


def _method_names() -> list[str]:
    from gradsift.select import available_selectors

    return available_selectors()


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


if __name__ == "__main__":
    sys.exit(main())
