"""What pretrain and the evaluation commands print leaves the reader nothing to guess."""

from __future__ import annotations

import pytest

from iecl.train.bookkeeping import Summary
from iecl.train.cli import main
from iecl.train.cli.pretrain import _loader_text, _print_summary
from iecl.train.config import load_config


def _summary(**final) -> Summary:
    return Summary(run_dir="runs/x", steps=4, steps_this_session=4, epochs=1.0, seconds=2.0, img_per_s=64.0,
                   final={"effective_rank_query": 5.0, "renyi2_query": 1.5, **final}, stopped_by="done",
                   losses={"loss": 1.0})


def test_a_negative_mi_bound_is_called_vacuous(capsys):
    _print_summary(_summary(mi_bound=-0.89, mi_ceiling=2.079))
    assert "InfoNCE MI bound -0.890 of 2.079 nats (negative, so vacuous" in capsys.readouterr().out
    _print_summary(_summary(mi_bound=0.5, mi_ceiling=2.079))
    out = capsys.readouterr().out
    assert "InfoNCE MI bound 0.500 of 2.079 nats\n" in out and "vacuous" not in out


@pytest.mark.parametrize("overrides,text", [
    (["data.workers=0"], "loader pil, in the training process"),
    (["data.workers=6"], "loader pil, 6 worker process(es)"),
    (["data.backend=dali", "data.decode=window", "train.device=cuda"], "loader dali, window decode on the GPU"),
])
def test_the_header_names_the_loader(overrides, text):
    assert _loader_text(load_config(None, overrides)) == text


@pytest.mark.parametrize("command,phrases", [
    ("make-synthetic", ["how many images in all", "how many classes", "seeds the images' content (default 0)"]),
    ("mi", ["default: the checkpoint's run.seed"]),
])
def test_help_explains_every_option(capsys, command, phrases):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(p in out for p in phrases), out


def test_help_examples_name_folders_runs_really_get():
    import re

    from iecl.train.cli import eval as eval_cli
    from iecl.train.cli import mi as mi_cli

    for text in (eval_cli.KNN_HELP, eval_cli.LINEVAL_HELP, mi_cli.MI_HELP):
        for name in re.findall(r"runs/([^\s/]+)", text):
            assert re.fullmatch(r"[a-z0-9]+-resnet(18|50)-\d{8}-\d{6}", name), name  # <method>-<backbone>-<stamp>


def test_the_mi_parser_names_the_pair_kinds_the_estimator_has():
    from iecl.train.cli.mi import PAIR_CHOICES
    from iecl.train.eval.pairs import PAIRS

    assert PAIR_CHOICES == PAIRS


@pytest.mark.parametrize("argv", [["pretrain", "--bogus"], ["mi"], ["knn", "--nope"], ["validate"]])
def test_a_train_commands_argument_error_imports_no_torch(argv):
    import subprocess
    import sys

    script = ("import sys; from iecl.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=False).stdout
    assert out.strip().splitlines()[-1] == "False"
