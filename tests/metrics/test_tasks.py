"""Metric ``tasks``: lm-evaluation-harness inside a job gives the numbers of lm-eval's own CLI,
its settings key only the jobs that ask for it, and the offline tasks rebuild byte for byte."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from ptqscale.assets import ZOO_CHECKPOINTS
from ptqscale.data.tasks import (
    CONTINUATION,
    ENDING_WORDS,
    SPECS,
    TASKS_DIR,
    build_task,
    to_jsonl,
)
from ptqscale.data.tasks import (
    TASKS as TASK_NAMES,
)
from ptqscale.errors import ConfigError
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job, validate_job

FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false", "wandb.mode=disabled",
        "model=gutenberg-llama-200k", "model.device=cpu"]
TASKS = ["metrics=[nll,weight_sqnr,model_bytes,tasks]", "eval.tasks.names=[ptq_gutenberg_cloze]",
         "eval.tasks.limit=100"]


@pytest.fixture
def composed():
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        yield lambda overrides=(): compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_shipped_task_data_is_what_the_builder_makes(name):
    items = build_task(name)
    assert (TASKS_DIR / f"{name}.jsonl").read_text(encoding="utf-8") == to_jsonl(items)
    assert (TASKS_DIR / f"{name}.yaml").is_file()
    assert len(items) == {**SPECS, **CONTINUATION}[name][3]
    k = 2 if name in CONTINUATION else 4
    for item in items[:50]:
        assert len(set(item["choices"])) == k and 0 <= item["label"] < k


def test_continuation_real_ending_and_another_authors_ending():
    """Each item's labelled choice closes its own passage; the other one closes a passage of
    a book by another author; both are ENDING_WORDS words."""
    from ptqscale.data.tasks import _documents, _split

    source, lo, hi, _ = CONTINUATION["ptq_gutenberg_continuation"]
    author_of = {}   # paragraph ending -> authors whose books end a paragraph with it
    paragraphs = set()
    for author, text in _documents(source):
        for p in _split(text):
            if lo <= len(p.split(" ")) <= hi:
                paragraphs.add(p)
                author_of.setdefault(" ".join(p.split(" ")[-ENDING_WORDS:]), set()).add(author)
    items = build_task("ptq_gutenberg_continuation")
    assert {i["label"] for i in items} == {0, 1}   # the real ending is not always first
    for item in items:
        real, other = item["choices"][item["label"]], item["choices"][1 - item["label"]]
        assert f"{item['context']} {real}" in paragraphs
        assert len(real.split(" ")) == len(other.split(" ")) == ENDING_WORDS
        (author,) = author_of[real]
        assert author_of[other] - {author}, item   # another author's book ends with it


def test_without_lm_eval_the_tasks_metric_is_a_config_error(monkeypatch):
    from ptqscale.metrics import tasks

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)   # import fails as if absent
    tasks.task_manager.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"pip install 'ptqscale\[tasks\]'"):
            tasks.task_manager()
    finally:
        tasks.task_manager.cache_clear()


needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed (extra 'tasks')")


@needs_lm_eval
@pytest.mark.slow
def test_task_settings_key_only_the_jobs_that_ask(composed, tmp_path):
    paths = [f"paths.results={tmp_path}"]
    plain = validate_job(composed([*FAST, *paths]))
    # eval.tasks is read by the tasks metric only: no other job's key moves with it
    assert validate_job(composed([*FAST, *paths, "eval.tasks.limit=5"])).key == plain.key
    asked = validate_job(composed([*FAST, *paths, *TASKS]))
    other = validate_job(composed([*FAST, *paths, *TASKS[:2], "eval.tasks.limit=50"]))
    assert len({plain.key, asked.key, other.key}) == 3
    with pytest.raises(ConfigError, match="eval.tasks.names"):
        validate_job(composed([*FAST, *paths, TASKS[0]]))
    with pytest.raises(ConfigError, match="unknown task 'ptq_gutenberg_clze'"):
        validate_job(composed([*FAST, *paths, TASKS[0], "eval.tasks.names=[ptq_gutenberg_clze]"]))


def _cli_table(folder, tasks: list[str], limit: int) -> dict[str, dict[str, str]]:
    """lm-eval's CLI on an HF folder: ``{task: {metric: printed value}}`` of its results table
    (a task's name is printed on its first row only: later rows belong to it too)."""
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folder},dtype=float32", "--tasks", ",".join(tasks), "--include_path",
         str(TASKS_DIR), "--device", "cpu", "--batch_size", "16", "--limit", str(limit)],
        capture_output=True, text=True, timeout=600, check=True).stdout
    table: dict[str, dict[str, str]] = {}
    task = None
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9 or cells[4] not in ("acc", "acc_norm"):
            continue
        task = cells[0] or task
        table.setdefault(task, {})
        table[task][cells[4]] = cells[6]
        table[task][f"{cells[4]}_stderr"] = cells[8]
    assert {t: set(v) for t, v in table.items()} == {
        t: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"} for t in tasks}, out
    return table


@needs_lm_eval
@pytest.mark.slow
def test_job_accuracy_equals_lm_eval_cli(composed, tmp_path):
    both = ["ptq_gutenberg_cloze", "ptq_gutenberg_continuation"]
    rec = run_job(composed([*FAST, f"paths.results={tmp_path}", "method=none", TASKS[0],
                            f"eval.tasks.names=[{','.join(both)}]", TASKS[2]]))
    m = rec["metrics"]
    assert rec["status"] == "complete"
    printed = _cli_table(ZOO_CHECKPOINTS / "gutenberg-llama-200k", both, 100)
    for task in both:
        for field, value in printed[task].items():   # to the printed precision (4 decimals)
            decimals = len(value.partition(".")[2])
            assert m[f"task.{task}.{field}"] == pytest.approx(
                float(value), abs=0.5 * 10 ** -decimals + 1e-12), (task, field, value)
    assert m["tasks_acc"] == pytest.approx(sum(m[f"task.{t}.acc"] for t in both) / 2)
    assert m["task.ptq_gutenberg_cloze.acc"] > 0.25   # above chance (4-way)
    assert m["task.ptq_gutenberg_continuation.acc"] > 0.5   # above chance (2-way)
    assert m["task.ptq_gutenberg_cloze.version"] == 1.0
    info = rec["metric_info"]["tasks"]
    assert info["settings"]["versions"] == {t: 1.0 for t in both}
    assert info["headline"] == "tasks_acc" and info["higher_is_better"] is True
    # the metric measures the quantized model: 3-bit RTN changes the answers ...
    q = run_job(composed([*FAST, f"paths.results={tmp_path}", "method=rtn", "format=int3_g64",
                          *TASKS]))
    assert q["metrics"]["task.ptq_gutenberg_cloze.acc_norm"] != m["task.ptq_gutenberg_cloze.acc_norm"]
    # ... and its numbers are the CLI's on those quantized weights, saved as an HF folder
    import transformers as T

    from ptqscale.methods import RTNConfig, quantize

    folder = ZOO_CHECKPOINTS / "gutenberg-llama-200k"
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    quantize(model, RTNConfig(format="int3_g64"))
    model.save_pretrained(tmp_path / "int3")
    T.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "int3")
    printed = _cli_table(tmp_path / "int3", ["ptq_gutenberg_cloze"], 100)["ptq_gutenberg_cloze"]
    for field, value in printed.items():
        decimals = len(value.partition(".")[2])
        assert q["metrics"][f"task.ptq_gutenberg_cloze.{field}"] == pytest.approx(
            float(value), abs=0.5 * 10 ** -decimals + 1e-12), (field, value)


@needs_lm_eval
@pytest.mark.slow
def test_continuation_task_scores_above_chance_on_a_trained_model():
    import transformers as T

    from ptqscale.metrics.tasks import TasksConfig, flatten, run_tasks

    folder = ZOO_CHECKPOINTS / "gutenberg-llama-200k"
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    names = ["ptq_gutenberg_continuation"]
    m = flatten(run_tasks(model, tok, TasksConfig(names=names, limit=150)), names)
    # 2-way: chance 0.5; 0.66 on all 300 items (docs/tasks.md); 3 stderr above chance
    assert m["tasks_acc"] > 0.5 + 3 * m["task.ptq_gutenberg_continuation.acc_stderr"], m


STANDARD = ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande",
            "boolq", "mmlu"]


@needs_lm_eval
@pytest.mark.slow   # lm-eval indexes its ~14k task YAMLs once per process (~30 s on 2 cores)
def test_standard_task_names_validate_offline_and_group_subtasks_enter_the_key(composed,
                                                                              tmp_path,
                                                                              monkeypatch):
    """lm-eval's own tasks (they need the hub to run) are known at validation, with their
    versions; a group (mmlu, 5-shot) is keyed by the versions of all the tasks it runs."""
    from ptqscale.metrics import tasks

    paths = [f"paths.results={tmp_path}", TASKS[0]]
    for name in STANDARD:
        assert validate_job(composed([*FAST, *paths, f"eval.tasks.names=[{name}]"])).key
    settings = tasks._settings(composed([*FAST, *paths, f"eval.tasks.names=[{','.join(STANDARD)}]",
                                         "eval.tasks.num_fewshot=5"]).eval)
    assert settings["versions"]["boolq"] == 2.0 and settings["num_fewshot"] == 5
    assert set(settings["subtask_versions"]) == {"mmlu"}   # only the group has subtasks
    mmlu = settings["subtask_versions"]["mmlu"]
    assert {"mmlu_stem", "mmlu_humanities", "mmlu_abstract_algebra", "mmlu_virology"} <= set(mmlu)
    assert len([t for t in mmlu if not t.endswith(("stem", "other", "sciences", "humanities"))]) == 57
    assert "subtask_versions" not in tasks._settings(composed([*FAST, *TASKS]).eval)
    mmlu_job = [*FAST, *paths, "eval.tasks.names=[mmlu]", "eval.tasks.num_fewshot=5"]
    ours = [*FAST, *TASKS, f"paths.results={tmp_path}"]
    before = [validate_job(composed(job)).key for job in (mmlu_job, ours)]
    real = tasks.task_version
    monkeypatch.setattr(tasks, "task_version",   # a subject's definition changes: a new key
                        lambda n: 1.1 if n == "mmlu_anatomy" else real(n))
    assert validate_job(composed(mmlu_job)).key != before[0]
    assert validate_job(composed(ours)).key == before[1]
    monkeypatch.setattr(tasks, "task_version",   # so does a plain task's
                        lambda n: 2.0 if n == "ptq_gutenberg_cloze" else real(n))
    assert validate_job(composed(ours)).key != before[1]
