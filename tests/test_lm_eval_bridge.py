"""lm-eval bridge: a local multiple-choice task scored on our in-memory model equals a hand computation;
missing package and missing offline datasets give one-line errors."""
import json
import sys

import pytest
import torch

from modelpress.cli import main
from modelpress.errors import UserError

from .conftest import tiny_model_dir

lm_eval = pytest.importorskip("lm_eval")

DOCS = [{"question": "the quick brown", "choices": ["fox", "dog", "matters"], "label": 0},
        {"question": "compression keeps what", "choices": ["matters", "fox"], "label": 0},
        {"question": "the lazy", "choices": ["fox", "dog"], "label": 1},
        {"question": "jumps over the", "choices": ["lazy dog", "quick fox", "keeps"], "label": 0}]

TASK = """task: mp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""

ABSENT = """task: mp_absent
dataset_path: modelpress-test/not-in-any-cache
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: 0
"""


def _task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in DOCS))
    (d / "mp_tiny_mc.yaml").write_text(TASK.format(data=data))
    (d / "mp_absent.yaml").write_text(ABSENT)
    return d


@torch.no_grad()
def _hand_accuracy(model, tok) -> float:
    """lm-eval's multiple-choice protocol: argmax over choices of sum log p(" " + choice | question)."""
    right = 0
    for d in DOCS:
        ctx = tok(d["question"]).input_ids
        scores = []
        for c in d["choices"]:
            whole = tok(d["question"] + " " + c).input_ids
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            scores.append(sum(logp[len(whole) - 1 - len(cont) + i, t].item() for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return right / len(DOCS)


def test_local_task_matches_hand_computation(tmp_path):
    from modelpress.api import load
    from modelpress.eval.lm_eval_bridge import run_tasks
    model, tok = load(tiny_model_dir(tmp_path / "m"))
    res = run_tasks(model, tok, "mp_tiny_mc", include_path=str(_task_dir(tmp_path)), include_defaults=False, trust_code=True)
    assert res["mp_tiny_mc"]["acc,none"] == pytest.approx(_hand_accuracy(model, tok))


def test_cli_missing_dataset_offline_is_one_line(tmp_path, capsys):
    m = tiny_model_dir(tmp_path / "m")
    capsys.readouterr()
    rc = main(["eval", str(m), "--tasks", "mp_absent", "--limit", "2", "--tasks-dir", str(_task_dir(tmp_path)),
                         "--trust-tasks-code"])
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if "%|" not in x and x.strip()]   # minus progress bars
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("modelpress: error: ") and "not available" in lines[0]


def test_unknown_task_and_missing_package(tmp_path, monkeypatch):
    from modelpress.api import load
    from modelpress.eval.lm_eval_bridge import run_tasks
    model, tok = load(tiny_model_dir(tmp_path / "m"))
    with pytest.raises(UserError, match="unknown lm-eval task"):
        run_tasks(model, tok, "no_such_task", include_path=str(_task_dir(tmp_path)), include_defaults=False, trust_code=True)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match="lm-eval is not installed"):
        run_tasks(model, tok, "hellaswag")


@pytest.mark.slow
def test_builtin_tasks_without_hub_access(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = tiny_model_dir(tmp_path / "m")
    assert main(["eval", str(m), "--tasks", "hellaswag,arc_easy", "--limit", "5"]) == 2
    assert "not available" in capsys.readouterr().err
