"""The `lmforge` command line. The only module besides `pipeline/` that knows every stage."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge import distributed, methods
from lmforge.config import ConfigError, dump_config, iter_keys, load_config

app = typer.Typer(
    help="lmforge: fine-tune, align, merge, evaluate and serve language models from YAML configs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs: resolved values and every key.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Inspect and validate training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
reward_app = typer.Typer(help="Use a trained reward model.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
lab_app = typer.Typer(help="Design a decoder from components and build it.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")
console = Console(stderr=True)


@app.callback()
def _quiet_libraries() -> None:
    """Renames inside transformers/peft (FutureWarning) are not the user's concern on the CLI, nor
    the libraries' per-file bars and hints (`models/quiet.py`)."""
    from lmforge.models.quiet import quiet_libraries

    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_libraries()


TRACEBACK = typer.Option("--traceback", help="Show the full traceback on errors.")


def _fail(exc: BaseException, traceback: bool) -> None:
    """One clear line for errors a user can cause; full traceback only when asked."""
    if traceback:
        raise exc
    where = f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""
    console.print(f"[bold red]error[/]{where}: {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=1)


# OSError covers a model or file that cannot be found or read (hub id without a network, bad path).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError, RuntimeError)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config of the stage.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides: section.key=value ...")] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            help="Start over in train.output_dir, removing its checkpoints and metrics "
            "(train.resume=fresh); by default a rerun continues the same run's latest checkpoint."
        ),
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes on this machine (one per GPU): hands the run to torch's launcher "
            "(torchrun) and prints its command; train.distributed picks DDP, FSDP or DeepSpeed.",
        ),
    ] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="Machines in the run (with --nproc each).")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This machine's index (0: the first).")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of machine 0 (several machines).")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Port on machine 0 (several machines).")] = 29500,
    result_file: Annotated[Path | None, typer.Option(hidden=True)] = None,  # the pipeline reads it
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Run one training stage (sft, pretrain, dpo, orpo, simpo, kto, reward, grpo, ppo) from a YAML config."""
    if (nproc > 1 or nnodes > 1) and distributed.world_size() == 1:
        import shlex
        import subprocess

        where = (nnodes, node_rank, master_addr, master_port)
        args = [str(config), *(overrides or []), *(["--fresh"] if fresh else [])]
        args += ["--result-file", str(result_file)] if result_file else []
        command = distributed.launch_command(nproc, *where, [*args, *(["--traceback"] if traceback else [])])
        shown = ["torchrun", *command[3:]]  # the same launcher, as its own command
        console.print(f"[bold]launching[/]: {shlex.join(shown)}", soft_wrap=True)
        raise typer.Exit(subprocess.call(command))
    try:
        cfg = load_config(config, [*(overrides or []), *(["train.resume=fresh"] if fresh else [])])
        result = methods.run(cfg)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    distributed.finish()
    if not distributed.is_main():
        return
    if result_file is not None:
        from lmforge.artifacts import write_atomic

        fields = {"train_loss": result.train_loss, "steps": result.steps, "metrics": result.metrics}
        write_atomic(result_file, json.dumps(fields))
    console.print(
        f"[bold green]done[/]: {result.steps} steps, train loss {result.train_loss:.4f}, "
        f"{result.artifact.name}/ in {result.output_dir}"
    )


@data_app.command("check")
def data_check(
    target: Annotated[str, typer.Argument(help="A YAML config, or a dataset (file, folder, registry name).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Overrides: section.key=value ... (for a dataset: data.key=value)"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Tokenizer to count tokens with (default: the config's model).")
    ] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the config's).")] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="What the data is for: sft, pretrain, dpo, kto, grpo (default: config)."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per example (default: the config's).")
    ] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Read every record: counts, token lengths, truncation, bad records, 2 rendered examples."""
    from lmforge.config.data import DataConfig
    from lmforge.config.loader import load_data_config
    from lmforge.config.model import ModelConfig
    from lmforge.data.check import check_data, print_report
    from lmforge.data.loader import STAGE_NEEDS
    from lmforge.models.loading import is_vision_language, load_tokenizer

    try:
        if target.endswith((".yaml", ".yml")):
            cfg = load_config(Path(target), overrides or [])
            data, model_cfg, method = cfg.data, cfg.model, cfg.method.name
        else:
            data, model_cfg, method = load_data_config(target, overrides or []), None, "sft"
        if model is not None:
            model_cfg = ModelConfig(name_or_path=model)
        updates = {k: v for k, v in {"template": template, "max_length": max_length}.items() if v is not None}
        data = DataConfig.model_validate({**data.model_dump(), **updates})
        method = stage or method
        if method not in STAGE_NEEDS:
            raise ValueError(f"--stage {method} is not one of {', '.join(STAGE_NEEDS)}")
        tokenizer = chat_template = vision = None
        if model_cfg is not None:
            from lmforge.training.stage import template_for  # imports peft (and bitsandbytes)

            tokenizer = load_tokenizer(model_cfg)
            chat_template = template_for(data.template, model_cfg.name_or_path, tokenizer)
            if is_vision_language(model_cfg):  # images count as the tokens they will take
                from lmforge.data.multimodal import VisionProcessor

                vision = VisionProcessor.load(
                    model_cfg.name_or_path, tokenizer, data.min_pixels, data.max_pixels
                )
        report = check_data(data, STAGE_NEEDS[method], tokenizer, chat_template, vision)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    out = Console()
    print_report(report, out, unit="tokens" if tokenizer is not None else "characters (no --model)")
    if report.errors:
        out.print(f"[bold red]{report.errors} error(s)[/]: training would refuse this data")
        raise typer.Exit(code=1)
    out.print("[bold green]ok[/]: every record is usable")


@app.command()
def adapters(
    model: Annotated[str, typer.Option(help="Model folder or hub id (only its config is read).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Adapter settings: adapter.r=16 adapter.layers=top:8 ...")
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run code shipped with the model.")] = False,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Every adapter method with its trainable parameters on MODEL, for the given adapter settings."""
    from lmforge.adapters.build import adapter_table
    from lmforge.config import validate_config
    from lmforge.config.loader import parse_overrides

    try:
        nested = parse_overrides(overrides or [])
        if set(nested) - {"adapter"}:
            raise ValueError(
                f"only adapter.* settings apply here, not {', '.join(sorted(set(nested) - {'adapter'}))}"
            )
        raw = {"model": {"name_or_path": model}, "data": {"path": "-"}, **nested}
        config = validate_config(raw, source="command line")
        rows = adapter_table(model, config.adapter, trust_remote_code)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    table = Table(
        title=f"adapters on {model} (r={config.adapter.r}, preset={config.adapter.preset}, "
        f"layers={config.adapter.layers})"
    )
    for column in ("method", "trainable params", "% of model", "merges into base", "4/8-bit base"):
        table.add_column(column, justify="right" if "params" in column or "%" in column else "left")
    for row in rows:
        if "error" in row:
            table.add_row(row["method"], "-", "-", "-", escape(row["error"]))
            continue
        table.add_row(
            row["method"],
            f"{row['trainable']:,}",
            f"{100 * row['share']:.3f}",
            "yes" if row["mergeable"] else "no",
            "yes" if row["quantized_base"] else "no",
        )
    Console().print(table)


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option(help="Where everything is written.")] = Path("runs/quickstart"),
    seed: Annotated[int, typer.Option(help="Seed for data, model and training.")] = 0,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """The whole pipeline offline on a tiny model: tokenizer, pre-train, LoRA SFT, evaluate, merge, chat."""
    from lmforge.pipeline.quickstart import run_quickstart

    try:
        run_quickstart(output_dir, seed=seed)
    except USER_ERRORS as exc:
        _fail(exc, traceback)


@app.command()
def merge(
    base: Annotated[str, typer.Option(help="Base model folder or hub id (16-bit).")],
    adapter: Annotated[Path, typer.Option(help="Adapter folder to merge.")],
    out: Annotated[Path, typer.Option(help="Output folder for the merged model.")],
    dtype: Annotated[
        str, typer.Option(help="auto (as the base was saved), float32, bfloat16, float16.")
    ] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Run code shipped with the model.")] = False,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Merge an adapter (any method but moe_dora) into its unquantized base; saves safetensors."""
    from lmforge.export.merge import merge_adapter

    try:
        path = merge_adapter(base, adapter, out, dtype=dtype, trust_remote_code=trust_remote_code)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(f"[bold green]merged[/] model saved to {path}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="A merged 16-bit model folder (Llama, Mistral, Qwen2).")],
    out: Annotated[Path, typer.Option(help="The .gguf file (or a folder to put it in).")],
    type_: Annotated[str, typer.Option("--type", help="Tensor type: f16, bf16, f32 or q8_0.")] = "f16",
    modelfile: Annotated[bool, typer.Option(help="Also write an Ollama Modelfile beside it.")] = True,
    pre_tokenizer: Annotated[
        str | None,
        typer.Option(
            help="llama.cpp pre-tokenizer to write when none splits text as the tokenizer does "
            "(export refuses otherwise; a warning says what differs)."
        ),
    ] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Export a merged model to GGUF (llama.cpp, Ollama), with an Ollama Modelfile."""
    from lmforge.export.gguf import export_gguf, write_modelfile

    try:
        path = export_gguf(model, out, type_, pre_tokenizer=pre_tokenizer)
        written = write_modelfile(path, model) if modelfile else None
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(f"[bold green]exported[/] {path}" + (f" and {written}" if written else ""))


@app.command()
def quantize(
    model: Annotated[Path, typer.Option(help="A merged 16-bit model folder.")],
    out: Annotated[Path, typer.Option(help="Output folder for the quantized checkpoint.")],
    method: Annotated[str, typer.Option(help="bnb-4bit, bnb-8bit or gptq (CUDA, gptqmodel).")] = "bnb-4bit",
    calibration: Annotated[str | None, typer.Option(help="GPTQ calibration data file.")] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Save a quantized checkpoint of a merged model (bitsandbytes 4/8-bit, or GPTQ)."""
    from lmforge.export.quantize import quantize_model

    try:
        path = quantize_model(model, out, method, calibration=calibration)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(f"[bold green]quantized[/] ({method}) model saved to {path}")


@lab_app.command("build")
def lab_build(
    arch: Annotated[Path, typer.Argument(help="Architecture YAML (see examples/lab/arch.yaml).")],
    out: Annotated[Path, typer.Option(help="Folder for the new model (safetensors + tokenizer).")],
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Build a model with random weights from an architecture YAML, in Hugging Face format."""
    from lmforge.data.templates import get_template
    from lmforge.lab.build import build, model_info
    from lmforge.lab.spec import load_arch
    from lmforge.models.loading import arch_tokenizer

    try:
        path = build(load_arch(arch), out, arch_tokenizer(arch), get_template("chatml"))
        info = model_info(path)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(f"[bold green]built[/] {info.total:,}-parameter model in {path}")


@lab_app.command("info")
def lab_info(
    source: Annotated[Path, typer.Argument(help="A lab model folder or an architecture YAML.")],
    context: Annotated[
        int | None, typer.Option(help="Sequence length for FLOPs (default: max_position_embeddings).")
    ] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Parameters per component and forward FLOPs per token of a lab model."""
    from lmforge.lab.build import model_info
    from lmforge.models.loading import arch_tokenizer

    try:
        info = model_info(source, context, arch_tokenizer(source) if Path(source).is_file() else None)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    c = info.config
    kind = (
        "multi-head"
        if c.num_key_value_heads == c.num_attention_heads
        else ("multi-query" if c.num_key_value_heads == 1 else "grouped-query")
    )
    out = Console()
    out.print(
        f"position {c.position_type} · norm {c.norm_type} · activation {c.hidden_act} · {kind} attention "
        f"({c.num_attention_heads} query / {c.num_key_value_heads} key-value heads)\n"
        f"d_model {c.hidden_size} · {c.num_hidden_layers} layers · d_ff {c.intermediate_size} · "
        f"vocab {c.vocab_size} · tied embeddings {c.tie_word_embeddings}"
    )
    table = Table("component", "parameters", "share")
    for count in info.counts:
        table.add_row(count.component, f"{count.parameters:,}", f"{100 * count.parameters / info.total:.1f}%")
    table.add_row("[bold]total", f"[bold]{info.total:,}", "100%")
    out.print(table)
    out.print(
        f"forward FLOPs per token at {info.context} tokens: {info.flops:,} ({info.flops / 1e6:.2f} MFLOP); "
        f"training ≈ 3x: {3 * info.flops / 1e6:.2f} MFLOP per token"
    )


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="Model folder or hub id (merged, or the base of --adapter).")],
    prompt: Annotated[str | None, typer.Argument(help="Answer this one prompt and exit.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter folder on top of --model.")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the one saved).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    demo: Annotated[bool, typer.Option(help="Answer a few built-in prompts and exit.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    cache: Annotated[str, typer.Option(help="KV cache: dynamic or static (preallocated).")] = "dynamic",
    top_k: Annotated[int, typer.Option(help="Keep the k likeliest tokens (0: all).")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help=">1 discourages repeating tokens.")] = 1.0,
    hide_reasoning: Annotated[
        bool, typer.Option(help="Show a reasoning model's answer without its <think> trace.")
    ] = False,
    image: Annotated[
        list[Path] | None, typer.Option(help="Image(s) for a vision-language model, with the first message.")
    ] = None,
    tools: Annotated[
        Path | None,
        typer.Option(help="A JSON file of tool schemas to offer; you type each call's result."),
    ] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Chat with a model (streaming, KV cache on), using the template it was trained with."""
    from lmforge.data.tools import read_tools
    from lmforge.inference.chat import DEMO_PROMPTS, answer, interactive, with_images
    from lmforge.inference.engine import Engine, SamplingParams

    images = list(image or [])
    try:
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            cache=cache,
        )
        engine = Engine.load(model, adapter=adapter, template=template)
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--image {', '.join(missing)} does not exist")
        if images and engine.vision is None:
            raise ValueError(
                f"--image needs a vision-language model (e.g. Qwen2-VL); {model} has no vision tower"
            )
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    out = Console()
    if prompt is not None or demo:
        for message in [prompt] if prompt is not None else DEMO_PROMPTS:
            out.print(f"[bold green]you[/]: {escape(message)}")
            try:
                answer(engine, [], with_images(message, images), params, out, system, images, hide_reasoning)
            except USER_ERRORS as exc:
                _fail(exc, traceback)
                return
        return
    if not sys.stdin.isatty():
        console.print("[dim]reading prompts from standard input, one per line[/]")
    try:
        offered = read_tools(tools.read_text(encoding="utf-8"), str(tools), "tools") if tools else ()
        interactive(engine, params, system, images, hide_reasoning, offered)
    except USER_ERRORS as exc:  # a generation that failed: one line, not a hang or a traceback
        _fail(exc, traceback)


@app.command()
def predict(
    model: Annotated[
        str,
        typer.Option(
            help="Model folder or hub id (merged, or the base of --adapter), or an adapter folder "
            "(over the base its adapter_config.json names)."
        ),
    ],
    data: Annotated[str, typer.Option(help="Data set: file, folder, registry name or hub id.")],
    out: Annotated[
        Path,
        typer.Option(help="The jsonl file to write (appended to: a rerun with the same settings resumes)."),
    ],
    adapter: Annotated[str | None, typer.Option(help="Adapter folder on top of --model.")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the one saved).")] = None,
    dataset_dir: Annotated[str, typer.Option(help="Folder of datasets.yaml / dataset_info.json.")] = ".",
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    cache: Annotated[str, typer.Option(help="KV cache: dynamic or static (preallocated).")] = "dynamic",
    backend: Annotated[
        str, typer.Option(help="transformers (any device) or vllm (CUDA, pip install vllm).")
    ] = ("transformers"),
    fresh: Annotated[
        bool, typer.Option(help="Start --out over instead of resuming it (needed after other settings).")
    ] = False,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Generate an answer for every record of a data set into jsonl (prompt, output, reference,
    token counts, timing), with a progress bar; rerunning with the same model, data and settings
    resumes after the last complete line (other settings are refused: --fresh starts over)."""
    from lmforge.inference.engine import Engine, SamplingParams
    from lmforge.inference.predict import model_and_adapter, read_examples, resume_from, run_settings
    from lmforge.inference.predict import predict as run_predict

    try:
        examples = read_examples(data, dataset_dir)[:limit]
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, cache=cache
        )
        if backend not in ("transformers", "vllm"):
            raise ValueError(f"--backend {backend}: use transformers or vllm")
        model, adapter = model_and_adapter(model, adapter)
        settings = run_settings(params, model, adapter, data, dataset_dir, template, backend)
        resume_from(out, settings, fresh)  # before the model loads: a refusal costs nothing
        if backend == "vllm":
            from lmforge.inference.predict import VllmEngine

            engine = VllmEngine(model, adapter, template)
        else:
            engine = Engine.load(model, adapter=adapter, template=template)
        written = run_predict(engine, examples, out, params, batch_size, settings=settings)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(f"[bold green]wrote[/] {written} predictions to {out} ({len(examples)} records in all)")


@app.command("run")
def run_(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML: shared sections and stages in order.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides: key=value (e.g. shared.train.max_steps=10).")
    ] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Rerun this stage and all after it.")] = None,
    only: Annotated[str | None, typer.Option(help="Run only this stage (its inputs must be done).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan: what runs, resumes or is skipped.")] = False,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Run a multi-stage pipeline (training stages, merge, quantize, export, predict, eval): stages
    already done are skipped, an interrupted one resumes, a changed one reruns with all after it."""
    from lmforge.config.loader import parse_overrides
    from lmforge.pipeline.runner import run_pipeline
    from lmforge.pipeline.spec import load_pipeline

    try:
        spec = load_pipeline(pipeline, parse_overrides(overrides or []))
        run_pipeline(spec, start=from_, only=only, dry_run=dry_run)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    if not dry_run:
        console.print(f"[bold green]done[/]: {spec.output_dir}/manifest.json, report.md and report.html")


@app.command("eval")
def eval_(
    config: Annotated[Path, typer.Argument(help="YAML eval config: models and tasks.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides: key=value (e.g. output_dir=runs/x).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Recompute results already saved in output_dir.")] = False,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Evaluate models on tasks (perplexity, MMLU/CMMLU/C-Eval, generation metrics, reasoning,
    multimodal, query suites, lm-eval-harness): results.json, results.md and report.html."""
    from lmforge.config.loader import load_eval_config
    from lmforge.evaluation.report import task_table
    from lmforge.evaluation.runner import evaluate

    try:
        cfg = load_eval_config(config, overrides or [])
        result = evaluate(cfg, force=force)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    out = Console()
    for task in cfg.tasks:
        header, rows = task_table(result.results, task)
        table = Table(*header, title=f"{task.name} ({task.kind})")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    console.print(f"[bold green]done[/]: {result.output_dir}/results.json, results.md and report.html")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model folder or hub id (merged, or the base of --adapter).")],
    adapter: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH: an adapter served as model NAME (repeatable).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The base model's name in requests (default: folder name).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind (0.0.0.0 exposes it to the network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LMFORGE_API_KEY", help="Key clients send as Bearer (env LMFORGE_API_KEY)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Default max_tokens of a request.")] = 256,
    max_tokens_limit: Annotated[
        int | None,
        typer.Option(help="Cap on a request's max_tokens (default: the model's context less the prompt)."),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB (413 above).")] = 20,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image, width x height (400 above).")] = 4096
    * 4096,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the one saved).")] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder file:// image URLs may come from (off by default).")
    ] = None,
    reasoning: Annotated[
        str, typer.Option(help="<think> traces: separate (reasoning_content), hide, or show in content.")
    ] = "separate",
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Serve a model (and adapters over it) with an OpenAI-compatible API: /v1/chat/completions,
    /v1/completions, /v1/models, /health."""
    import secrets

    from lmforge.inference.server import Limits, create_app, load_served, run_server

    try:
        adapters = {}
        for item in adapter or []:
            adapter_name, sep, path = item.partition("=")
            if not sep or not adapter_name or not path:
                raise ValueError(f"--adapter {item!r}: use NAME=PATH, e.g. --adapter sql=runs/sql/adapter")
            adapters[adapter_name] = path
        served = load_served(model, adapters, name, image_root, template)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    if not api_key:
        api_key = secrets.token_urlsafe(24)
        console.print(f"[bold]no --api-key given[/]: clients must send this one: [bold]{api_key}[/]")
    console.print(f"serving {', '.join(served.names)} on http://{host}:{port}/v1")
    limits = Limits(int(max_body_mb * 2**20), max_image_pixels, max_tokens_limit)
    try:
        api = create_app(served, api_key, max_tokens, reasoning, limits)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    run_server(api, served, host, port)


@reward_app.command("score")
def reward_score(
    model: Annotated[Path, typer.Option(help="Reward folder (from method.name: reward) or a classifier.")],
    prompt: Annotated[str | None, typer.Option(help="Score one prompt ...")] = None,
    response: Annotated[str | None, typer.Option(help="... with this response.")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Or score a data set: prompt/response records, or chosen/rejected pairs."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write one JSON line per record here.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's).")] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Score prompt/response pairs; for preference pairs also the share where chosen wins."""
    from lmforge.inference.reward import score_command

    try:
        lines = score_command(model, prompt, response, data, out, base)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    for line in lines:
        Console().print(line)


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(help="YAML config.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides: section.key=value ...")] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Print the resolved config: defaults filled in, overrides applied, validated."""
    try:
        cfg = load_config(config, overrides or [])
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    typer.echo(dump_config(cfg), nl=False)


@config_app.command("keys")
def config_keys(
    section: Annotated[str | None, typer.Argument(help="Only keys of this section (e.g. train).")] = None,
    eval_: Annotated[bool, typer.Option("--eval", help="Keys of `lmforge eval` configs instead.")] = False,
) -> None:
    """List every config key with its type, default and help."""
    from lmforge.config.eval import EvalConfig

    table = Table(show_lines=False)
    for column in ("key", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for key, kind, default, help_text in iter_keys(EvalConfig) if eval_ else iter_keys():
        if section is None or key.startswith((section + ".", section + "[")):
            table.add_row(escape(key), escape(kind), escape(default), escape(help_text))
    Console(width=200).print(table)


@app.command()
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show package versions, devices (memory, compute capability, bf16/fp16) and which optional
    speedups (flash-attn, liger-kernel, bitsandbytes, vllm, deepspeed) are usable here, and why."""
    from lmforge.models.env import env_tables, gather_env

    report = gather_env()
    if as_json:
        typer.echo(report.to_json())
        return
    for table in env_tables(report):
        Console().print(table)


@app.command()
def wizard(
    out: Annotated[
        Path, typer.Option(help="Pipeline YAML to write (a lab architecture goes beside it: NAME_arch.yaml).")
    ] = Path("lmforge_wizard.yaml"),
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Answer questions step by step (model or lab architecture, data, optimizer, SFT, alignment);
    each answer is checked at once, and the pipeline YAML written is one `lmforge run` runs."""
    from lmforge.wizard import Prompter, run_wizard

    try:
        run_wizard(Prompter(), out)
    except USER_ERRORS as exc:
        _fail(exc, traceback)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
