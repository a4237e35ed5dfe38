"""`lmforge run`: bad pipeline files fail before anything runs; reruns skip, rerun what changed,
and resume a stage killed mid-way to the same final metrics as an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import with_pre_tokenizer
from lmforge.config import ConfigError
from lmforge.pipeline.runner import load_manifest, plan, run_pipeline
from lmforge.pipeline.spec import parse_pipeline
from lmforge.training.checkpoints import complete_checkpoints


def tiny_pipeline(base_dir: Path, data: Path, out: Path, steps: int = 12, save_steps: int = 0) -> dict:
    return {
        "name": "tiny",
        "output_dir": str(out),
        "shared": {
            "model": {"name_or_path": str(base_dir)},
            "data": {"template": "chatml", "max_length": 32},
            "train": {
                "batch_size": 8,
                "lr": 3e-3,
                "max_steps": steps,
                "save_steps": save_steps,
                "logging_steps": 2,
                "progress": False,
                "tensorboard": False,
                "seed": 0,
            },
        },
        "stages": [
            {
                "name": "sft",
                "kind": "sft",
                "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
                "data": {"path": str(data)},
            },
            {"name": "merged", "kind": "merge"},
            {
                "name": "eval",
                "kind": "eval",
                "models": ["sft", "merged"],
                "tasks": [{"kind": "perplexity", "data": str(data), "limit": 20}],
            },
        ],
    }


def stage(name: str, kind: str, **body) -> dict:
    return {"name": name, "kind": kind, **body}


SFT = stage("sft", "sft", data={"path": "d.json"})
BAD = [
    ([stage("sft", "sfft", data={"path": "d.json"})], "unknown stage kind `sfft` — did you mean `sft`?"),
    (
        [SFT, stage("m", "merge", **{"from": "sfx"})],
        "refers to a stage `sfx` that does not exist — did you mean `sft`?",
    ),
    ([{**SFT, "from": "sft"}], "a cycle (sft -> sft)"),
    ([stage("a", "merge", **{"from": "b"}), {**SFT, "name": "b"}], "a cycle (a -> b -> a)"),
    ([SFT, stage("a", "merge", **{"from": "c"}), {**SFT, "name": "c", "from": "sft"}], "a later stage `c`"),
    (
        [SFT, stage("m", "merge"), stage("q", "quantize"), stage("m2", "merge", **{"from": "q"})],
        "merge needs an adapter stage as `from`; `q` gives a quantized model",
    ),
    ([SFT, stage("q", "quantize")], "quantize needs a full 16-bit model as `from`"),
    (
        [SFT, stage("d", "dpo", adapter={"method": "dora"}, data={"path": "p.json"})],
        "add a merge stage between them",
    ),
    (
        [SFT, stage("m", "merge"), stage("q", "quantize"), stage("t", "sft", data={"path": "d.json"})],
        "quantized checkpoint",
    ),
    ([SFT, {**SFT}], "a stage named `sft` already exists"),
    ([stage("sft", "sft", data={"path": "d.json"}, trian={})], "unknown key `trian` — did you mean `train`?"),
    ([SFT, stage("m", "merge", dtyp="float16")], "stages[1] (m): unknown key `dtyp`"),
    ([SFT, stage("e", "export", type="q4_k")], "stages[1] (e): `type`"),
    ([SFT, stage("e", "eval", models=["nope"], tasks=[{"kind": "suite"}])], "refers to a stage `nope`"),
]


@pytest.mark.parametrize(("stages", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_pipelines_fail_before_anything_runs(stages, message, tmp_path) -> None:
    raw = {"output_dir": str(tmp_path / "out"), "shared": {"model": {"name_or_path": "m"}}, "stages": stages}
    with pytest.raises(ConfigError) as error:
        parse_pipeline(raw, "p.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("p.yaml")
    assert not (tmp_path / "out").exists()


def test_unknown_top_level_and_shared_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key `stage` — did you mean `stages`"):
        parse_pipeline({"stage": []}, "p.yaml")
    with pytest.raises(ConfigError, match="unknown section `shared.trian`"):
        parse_pipeline({"shared": {"trian": {}}, "stages": [SFT]}, "p.yaml")


@pytest.mark.xdist_group("quickstart")
def test_rerun_skips_and_a_changed_stage_reruns_with_the_ones_after_it(
    base_dir, alpaca_file, tmp_path
) -> None:
    raw = tiny_pipeline(base_dir, alpaca_file, tmp_path / "out")
    manifest = run_pipeline(parse_pipeline(raw), quiet=True)
    assert [manifest["stages"][s]["status"] for s in ("sft", "merged", "eval")] == ["done"] * 3
    adapter = tmp_path / "out" / "sft" / "adapter" / "adapter_model.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| sft | sft |" in report and "Loss curves" in report and "### perplexity" in report
    assert "data:image/png;base64" in (tmp_path / "out" / "report.html").read_text()
    record = manifest["stages"]["sft"]
    assert record["config"]["train"]["max_steps"] == 12 and record["metrics"]["steps"] == 12
    assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])

    spec = parse_pipeline(raw)
    assert [s.action for s in plan(spec, load_manifest(spec))] == ["skip", "skip", "skip"]
    raw["stages"][2]["tasks"][0]["limit"] = 10  # only the eval stage changes
    spec = parse_pipeline(raw)
    assert [s.action for s in plan(spec, load_manifest(spec))] == ["skip", "skip", "run"]
    run_pipeline(spec, quiet=True)
    assert adapter.stat().st_mtime_ns == trained_at  # sft was not retrained
    assert [s.action for s in plan(spec, load_manifest(spec), start="merged")] == ["skip", "run", "run"]
    assert [s.action for s in plan(spec, load_manifest(spec), only="eval")] == ["skip", "skip", "run"]
    raw["shared"]["train"]["lr"] = 1e-3  # the first stage changes: everything after it too
    changed = parse_pipeline(raw)
    assert [s.action for s in plan(changed, load_manifest(changed))] == ["run", "run", "run"]
    with pytest.raises(ConfigError, match="--only eval: its inputs sft, merged are not done"):
        plan(changed, load_manifest(changed), only="eval")


def test_a_first_run_reads_new_and_a_rerun_names_the_input_that_runs_again(
    base_dir, alpaca_file, tmp_path
) -> None:
    """The stage headers print these reasons: on a first run no stage runs "again"."""
    raw = tiny_pipeline(base_dir, alpaca_file, tmp_path / "out")
    spec = parse_pipeline(raw)
    first = plan(spec, {"stages": {}})
    assert [(s.action, s.reason) for s in first] == [("run", "new")] * 3
    done = {"status": "done", "output": {"path": str(tmp_path)}}
    manifest = {"stages": {s.stage.name: {**done, "hash": s.hash} for s in first}}
    raw["shared"]["train"]["lr"] = 1e-3  # sft changes; the stages reading it run again
    reasons = [s.reason for s in plan(parse_pipeline(raw), manifest)]
    assert reasons == [
        "changed (config, input or code)",
        "its input sft runs again",
        "its input sft runs again",
    ]


@pytest.mark.xdist_group("quickstart")
def test_a_pipeline_killed_mid_stage_resumes_to_the_same_result(base_dir, alpaca_file, tmp_path) -> None:
    whole = tiny_pipeline(base_dir, alpaca_file, tmp_path / "whole", steps=24, save_steps=6)
    uninterrupted = run_pipeline(parse_pipeline(whole), quiet=True)

    cut = tiny_pipeline(base_dir, alpaca_file, tmp_path / "cut", steps=24, save_steps=6)
    cut["shared"]["train"]["save_total_limit"] = None
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(cut))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while (
        not complete_checkpoints(tmp_path / "cut" / "sft")
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = complete_checkpoints(tmp_path / "cut" / "sft")
    assert saved, "the run was killed after its first checkpoint"
    assert not (tmp_path / "cut" / "sft" / "adapter").exists(), "killed before the stage finished"

    spec = parse_pipeline(cut)
    assert [s.action for s in plan(spec, load_manifest(spec))] == ["resume", "run", "run"]
    resumed = run_pipeline(spec, quiet=True)
    sft = resumed["stages"]["sft"]["metrics"]
    assert sft["steps"] == 24
    assert sft["resumed_from"].startswith("checkpoint-")  # it went on from a checkpoint, not from scratch
    # the manifest's train_loss is the whole run's mean, not only the resumed steps'
    whole_loss = uninterrupted["stages"]["sft"]["metrics"]["train_loss"]
    assert sft["train_loss"] == pytest.approx(whole_loss, rel=1e-4)
    before = uninterrupted["stages"]["eval"]["metrics"]
    after = resumed["stages"]["eval"]["metrics"]
    for model in ("sft", "merged"):
        assert after[model]["perplexity"]["perplexity"] == pytest.approx(
            before[model]["perplexity"]["perplexity"], rel=1e-4
        )


def test_flags_that_do_not_go_together_and_unknown_stages(tmp_path) -> None:
    spec = parse_pipeline(
        {"output_dir": str(tmp_path / "o"), "shared": {"model": {"name_or_path": "m"}}, "stages": [SFT]}
    )
    with pytest.raises(ConfigError, match="--from and --only do not go together"):
        plan(spec, {}, start="sft", only="sft")
    with pytest.raises(ConfigError, match="--from sfx: no such stage"):
        plan(spec, {}, start="sfx")


@pytest.mark.parametrize("name", ["..", ".git", "a/b", "manifest.json", "plots"])
def test_stage_names_must_be_plain_folder_names(name, tmp_path) -> None:
    raw = {
        "output_dir": str(tmp_path / "o"),
        "shared": {"model": {"name_or_path": "m"}},
        "stages": [{**SFT, "name": name}],
    }
    with pytest.raises(ConfigError, match="cannot name a stage"):
        parse_pipeline(raw, "p.yaml")


def test_output_dir_must_not_be_this_folder_or_above(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for output_dir in (".", str(tmp_path.parent)):
        with pytest.raises(ConfigError, match="give the pipeline its own folder"):
            parse_pipeline(
                {"output_dir": output_dir, "shared": {"model": {"name_or_path": "m"}}, "stages": [SFT]}
            )


def test_a_folder_the_pipeline_did_not_make_is_never_deleted(base_dir, alpaca_file, tmp_path) -> None:
    raw = tiny_pipeline(base_dir, alpaca_file, tmp_path / "out")
    keep = tmp_path / "out" / "sft" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    with pytest.raises(ConfigError, match=r"stages\[0\] \(sft\): .* was not made by this pipeline"):
        run_pipeline(parse_pipeline(raw), quiet=True)
    assert keep.read_text() == "mine"


def test_a_failing_stage_is_named_and_recorded(base_dir, alpaca_file, tmp_path) -> None:
    raw = tiny_pipeline(base_dir, alpaca_file, tmp_path / "out", steps=2)
    raw["stages"] = raw["stages"][:2] + [
        {"name": "answers", "kind": "predict", "from": "merged", "data": str(tmp_path / "missing.json")}
    ]
    with pytest.raises(ConfigError, match=r"stages\[2\] \(answers\): .*missing.json"):
        run_pipeline(parse_pipeline(raw), quiet=True)
    spec = parse_pipeline(raw)
    manifest = load_manifest(spec)
    assert manifest["stages"]["answers"]["status"] == "failed"
    assert (tmp_path / "out" / "report.md").is_file()  # the report is written even so
    assert [s.action for s in plan(spec, manifest)] == ["skip", "skip", "resume"]
    # a done stage whose output was deleted runs again, and so do the stages that read it
    shutil.rmtree(tmp_path / "out" / "merged")
    assert [s.action for s in plan(spec, manifest)] == ["skip", "run", "run"]


def test_overrides_index_stages_by_position(tmp_path) -> None:
    from lmforge.config.loader import parse_overrides
    from lmforge.pipeline.spec import load_pipeline

    path = tmp_path / "p.yaml"
    raw = {"output_dir": str(tmp_path / "o"), "shared": {"model": {"name_or_path": "m"}}, "stages": [SFT]}
    path.write_text(yaml.safe_dump(raw))
    spec = load_pipeline(path, parse_overrides(["stages.0.train.lr=2e-4", "shared.train.max_steps=5"]))
    assert spec.stages[0].body["train"] == {"lr": 2e-4}
    assert spec.stages[0].body["data"] == {"path": "d.json"}  # the rest of the stage is kept
    assert spec.shared["train"] == {"max_steps": 5}
    with pytest.raises(ConfigError, match="override `stages.3`: `stages` has items 0 to 0"):
        load_pipeline(path, parse_overrides(["stages.3.train.lr=1"]))


def test_hardware_auto_is_a_pipeline_section():
    from lmforge.pipeline.spec import parse_pipeline, training_config

    raw = {
        "output_dir": "runs/p",
        "shared": {"hardware": "auto", "model": {"name_or_path": "m"}, "data": {"path": "d.json"}},
        "stages": [{"name": "sft", "kind": "sft"}, {"name": "manual", "kind": "sft", "hardware": "manual"}],
    }
    spec = parse_pipeline(raw)
    assert training_config(spec, spec.stages[0], None).hardware == "auto"
    assert training_config(spec, spec.stages[1], None).hardware == "manual"


def test_an_export_stage_refuses_a_pre_tokenizer_llama_cpp_lacks_unless_it_names_one(base_dir, tmp_path):
    """As `lmforge export --pre-tokenizer`: the stage's `pre_tokenizer` is what lets it export."""
    from gguf import GGUFReader

    from lmforge.export.gguf import GGUFExportError
    from lmforge.pipeline.runner import execute

    # No llama.cpp pre-tokenizer splits text as Whitespace does.
    model = with_pre_tokenizer(base_dir, tmp_path / "model", {"type": "Whitespace"})
    manifest = {"stages": {"m": {"status": "done", "output": {"kind": "model", "path": str(model)}}}}

    def export_step(**options):
        raw = {
            "output_dir": str(tmp_path / "out"),
            "shared": {"model": {"name_or_path": str(base_dir)}},
            "stages": [
                stage("m", "pretrain", adapter={"method": "none"}, data={"path": "d.json"}),
                stage("gguf", "export", **options),
            ],
        }
        spec = parse_pipeline(raw)
        return spec, next(s for s in plan(spec, manifest) if s.stage.name == "gguf")

    spec, step = export_step(type="f32", modelfile=False)
    with pytest.raises(GGUFExportError, match="--pre-tokenizer NAME"):
        execute(spec, step, manifest, quiet=True)
    spec, step = export_step(type="f32", modelfile=False, pre_tokenizer="default")
    execute(spec, step, manifest, quiet=True)
    pre = GGUFReader(step.output.path).fields["tokenizer.ggml.pre"].contents()
    assert pre == "default"


@pytest.mark.xdist_group("distributed")
def test_a_stage_with_nproc_runs_on_that_many_processes(base_dir, alpaca_file, tmp_path) -> None:
    """A training stage's `nproc: 2` (batch 4 each) trains as the stage in one process (batch 8)."""
    runs = {}
    for name, nproc, batch in (("one", 1, 8), ("two", 2, 4)):
        raw = tiny_pipeline(base_dir, alpaca_file, tmp_path / name)
        raw["stages"] = [{**raw["stages"][0], "nproc": nproc}]
        raw["shared"]["train"]["batch_size"] = batch
        runs[name] = run_pipeline(parse_pipeline(raw), quiet=True)["stages"]["sft"]
    assert runs["two"]["status"] == "done" and runs["two"]["metrics"]["steps"] == 12
    assert runs["two"]["metrics"]["train_loss"] == pytest.approx(
        runs["one"]["metrics"]["train_loss"], rel=1e-5
    )
    assert (tmp_path / "two" / "sft" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("nproc", "message"), [(0, "1 or more"), ("2", "whole number"), (2, "a merge stage")]
)
def test_nproc_is_a_count_of_a_training_stage(tmp_path, nproc, message) -> None:
    raw = {
        "output_dir": str(tmp_path),
        "shared": {"model": {"name_or_path": "m"}},
        "stages": [stage("sft", "sft", data={"path": "d.json"}), stage("m", "merge", nproc=nproc)],
    }
    if nproc != 2:
        raw["stages"][0]["nproc"], raw["stages"][1] = nproc, stage("m", "merge")
    with pytest.raises(ConfigError, match=message):
        parse_pipeline(raw)
