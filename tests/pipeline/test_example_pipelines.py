"""The shipped example pipelines validate as written, and a tiny-model version of each runs end to
end (same stages, kinds and hand-overs; tiny models, data and step counts)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import yaml

from lmforge.evaluation import benchmarks
from lmforge.pipeline.runner import run_pipeline
from lmforge.pipeline.spec import TRAINING, parse_pipeline

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "pipelines").glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / "pipelines" / name).read_text())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_pipeline_validates_and_shows_its_command(path: Path) -> None:
    assert path.read_text().splitlines()[0] == f"# lmforge run {path.relative_to(ROOT).as_posix()}"
    spec = parse_pipeline(yaml.safe_load(path.read_text()), str(path))
    assert len(spec.stages) >= 3


def shrink(raw: dict, out: Path, model: Path, data: dict[str, Path], mmlu: Path | None = None) -> dict:
    """The example with tiny sizes: the same stages, each on `data[kind]`, two optimizer steps."""
    raw = copy.deepcopy(raw)
    raw["output_dir"] = str(out)
    shared = raw["shared"]
    shared["model"] = {**shared["model"], "name_or_path": str(model)}
    shared["model"].pop("dtype", None)
    shared["data"] = {**shared["data"], "max_length": 96}
    shared["train"] = {
        "batch_size": 2,
        "grad_accum": 1,
        "max_steps": 2,
        "logging_steps": 1,
        "progress": False,
        "tensorboard": False,
    }
    for stage in raw["stages"]:
        if stage["kind"] in TRAINING:
            stage["data"] = {**stage.get("data", {}), "path": str(data[stage["kind"]])}
            stage["train"] = {**stage.get("train", {}), "max_steps": 2}
            adapter = stage.get("adapter", {})
            if "moe_dora" in adapter:
                adapter["moe_dora"]["top_layers"] = 1
            if adapter.get("method") == "fourierft":
                adapter["layers"] = [1]
            if stage["kind"] == "grpo":
                stage["method"]["sampling"] = {"num_generations": 2, "max_completion_length": 6}
        if stage["kind"] == "eval":
            stage["generation"] = {"max_new_tokens": 4, "batch_size": 8}
            for task in stage["tasks"]:
                task["limit"] = 3
                if task["kind"] == "multiple_choice":
                    task["path"] = str(mmlu)
                elif "data" in task:
                    task["data"] = str(data[task["kind"]])
                if task["kind"] == "multimodal":
                    task["match"] = "exact"
    return raw


def write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def text_data(tmp_path: Path) -> dict[str, Path]:
    sft = [
        {"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)}
        for a in range(6)
        for b in range(6)
    ]
    pairs = [
        {"instruction": r["instruction"], "chosen": r["output"], "rejected": r["output"] + "0"} for r in sft
    ]
    prompts = [{"prompt": r["instruction"], "answer": r["output"]} for r in sft]
    questions = [{"question": r["instruction"], "answer": f"so\n#### {r['output']}"} for r in sft]
    paths = {
        "sft": write(tmp_path / "sft.json", sft),
        "pairs": write(tmp_path / "pairs.json", pairs),
        "prompts": write(tmp_path / "prompts.json", prompts),
        "questions": write(tmp_path / "questions.json", questions),
    }
    return {
        "sft": paths["sft"],
        "dpo": paths["pairs"],
        "orpo": paths["pairs"],
        "grpo": paths["prompts"],
        "generation": paths["sft"],
        "reasoning": paths["questions"],
    }


def check_done(manifest: dict, raw: dict) -> None:
    assert [manifest["stages"][s["name"]]["status"] for s in raw["stages"]] == ["done"] * len(raw["stages"])


@pytest.mark.xdist_group("pipelines")
def test_tiny_llama2_chat_pipeline(base_dir, tmp_path) -> None:
    mmlu = benchmarks.write_fixture("mmlu", tmp_path / "mmlu", {"astronomy": 3})
    raw = shrink(load("llama2_chat.yaml"), tmp_path / "out", base_dir, text_data(tmp_path), mmlu)
    manifest = run_pipeline(parse_pipeline(raw), quiet=True)
    check_done(manifest, raw)
    out = tmp_path / "out"
    assert json.loads((out / "sft-q4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert list((out / "sft-gguf").glob("*.gguf")) and (out / "sft-gguf" / "Modelfile").is_file()
    assert set(manifest["stages"]["eval"]["metrics"]) == {"sft", "moe-dora", "orpo"}


@pytest.mark.xdist_group("pipelines")
def test_tiny_deepseek_r1_reasoning_pipeline(base_dir, tmp_path) -> None:
    raw = shrink(load("deepseek_r1_reasoning.yaml"), tmp_path / "out", base_dir, text_data(tmp_path))
    manifest = run_pipeline(parse_pipeline(raw), quiet=True)
    check_done(manifest, raw)
    reasoning = manifest["stages"]["eval"]["metrics"]["merged"]["reasoning"]
    assert reasoning["items"] == 3 and 0.0 <= reasoning["accuracy"] <= 1.0


@pytest.mark.xdist_group("pipelines")
def test_tiny_qwen2_vl_pipeline(vlm_dir, shapes_file, tmp_path) -> None:
    from lmforge.data.shapes import COLOURS

    rng = random.Random(0)
    records = json.loads(shapes_file.read_text())
    pairs = [
        {
            "messages": r["messages"][:1],
            "chosen": r["messages"][1]["content"],
            "rejected": rng.choice([c for c in COLOURS if c != r["messages"][1]["content"]]),
            "images": r["images"],  # relative to the data file's folder, as the loader requires
        }
        for r in records
    ]
    pairs_file = write(shapes_file.parent / "pairs.json", pairs)
    data = {"sft": shapes_file, "dpo": pairs_file, "multimodal": shapes_file}
    raw = shrink(load("qwen2_vl.yaml"), tmp_path / "out", vlm_dir, data)
    raw["shared"]["data"].pop("max_pixels")
    manifest = run_pipeline(parse_pipeline(raw), quiet=True)
    check_done(manifest, raw)
    assert manifest["stages"]["eval"]["metrics"]["dpo"]["multimodal"]["items"] == 3


@pytest.mark.xdist_group("pipelines")
def test_tiny_lab_scratch_pipeline(tokenizer, tmp_path) -> None:
    """Build a lab model from its architecture file inside a pipeline, pre-train, SFT, merge and
    evaluate; rerunning skips every stage, and editing the architecture reruns them all."""
    from lmforge.pipeline.runner import load_manifest, plan

    raw = load("lab_scratch.yaml")
    tokenizer.save_pretrained(tmp_path / "tok")
    arch = yaml.safe_load((ROOT / "examples" / "lab" / "arch.yaml").read_text())
    arch.update(tokenizer=str(tmp_path / "tok"), d_model=32, n_layers=2)
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(arch))
    data = text_data(tmp_path)
    corpus = write(
        tmp_path / "corpus.json",
        [{"text": f"add {a} and {b} is {a + b}"} for a in range(9) for b in range(9)],
    )
    (tmp_path / "notes.txt").write_text("a note\nanother note\n")
    raw["output_dir"] = str(tmp_path / "out")
    pretrain_stage, sft_stage, _, eval_stage = raw["stages"]
    pretrain_stage["model"]["arch"] = str(tmp_path / "arch.yaml")
    pretrain_stage["data"]["datasets"] = [
        {"path": str(corpus), "weight": 3},
        {"path": str(tmp_path / "notes.txt"), "weight": 1},
    ]
    pretrain_stage["train"].update(max_steps=3, save_steps=0)
    sft_stage["data"]["path"] = str(data["sft"])
    sft_stage["train"]["max_steps"] = 2
    raw["shared"]["train"].update(
        batch_size=2, progress=False, tensorboard=False, logging_steps=1, warmup_steps=0
    )
    eval_stage["generation"] = {"max_new_tokens": 4, "batch_size": 8}
    for task in eval_stage["tasks"]:
        task.update(data=str(data["sft"]), limit=3)
    manifest = run_pipeline(parse_pipeline(raw), quiet=True)
    check_done(manifest, raw)
    assert (
        json.loads((tmp_path / "out" / "pretrain" / "model" / "config.json").read_text())["model_type"]
        == "lmforge_lab"
    )
    assert set(manifest["stages"]["eval"]["metrics"]) == {"pretrain", "sft", "merged"}

    spec = parse_pipeline(raw)
    assert [step.action for step in plan(spec, load_manifest(spec))] == ["skip"] * 4
    arch["n_layers"] = 3
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(arch))
    assert [step.action for step in plan(spec, load_manifest(spec))] == ["run"] * 4
