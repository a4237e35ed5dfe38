"""`lmforge env`: what this machine offers lmforge — package versions, devices with their memory
and dtypes, and which optional speedups are usable here (and if not, why).

Gathering is separate from printing, so tests read the report as data. Optional packages are
looked up with `importlib.util.find_spec` and their versions from installed metadata, without
importing them (vllm and deepspeed take seconds to import; bitsandbytes prints warnings on CPU);
only flash-attn is imported, where a GPU could run it, because a build that does not match the
installed torch/CUDA fails exactly there.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch
from rich.table import Table

from lmforge.models.hardware import FLASH_ATTN_CAPABILITY, GB, cpu_bf16_features, ram_total_bytes

PACKAGES = (
    "lmforge",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
)
# CPU features with native fp16 arithmetic (x86 AVX-512 FP16 and AMX FP16; ARM's FP16).
CPU_FP16_FEATURES = ("avx512_fp16", "amx_fp16", "fp16_arith")


@dataclass(frozen=True)
class Speedup:
    """An optional package that makes training or inference faster, and whether it works here."""

    name: str
    package: str  # the distribution to install (pip install ...)
    module: str  # the module it imports as
    usable: bool
    reason: str


@dataclass(frozen=True)
class Device:
    """One device lmforge can run on, with its memory and the dtypes it computes in natively."""

    kind: str  # cuda, xpu, mps or cpu
    index: int
    name: str
    memory_gb: float | None
    bf16: bool  # native bf16 arithmetic
    fp16: bool  # native fp16 arithmetic
    capability: str | None = None  # CUDA compute capability, e.g. "8.0"
    notes: str = ""


@dataclass(frozen=True)
class EnvReport:
    """Everything `lmforge env` shows."""

    python: str
    versions: dict[str, str]  # package -> version, or "not installed"
    torch_cuda: str | None  # the CUDA version torch was built with (None: a CPU build)
    devices: list[Device] = field(default_factory=list)
    speedups: list[Speedup] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


# name, distribution, module: the optional speedups lmforge uses when present (see pyproject extras).
SPEEDUPS = (
    ("flash-attn", "flash-attn", "flash_attn"),
    ("liger-kernel", "liger-kernel", "liger_kernel"),
    ("bitsandbytes (CUDA)", "bitsandbytes", "bitsandbytes"),
    ("vllm", "vllm", "vllm"),
    ("deepspeed", "deepspeed", "deepspeed"),
)


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _imports(module: str) -> str | None:
    """None if `module` imports, else the error."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken build fails in many ways (ImportError, OSError, RuntimeError)
        return f"{type(exc).__name__}: {exc}"
    return None


def check_speedups(
    installed: Callable[[str], bool],
    cuda_capabilities: Sequence[tuple[int, int]],
    import_error: Callable[[str], str | None] = _imports,
) -> list[Speedup]:
    """Each speedup's status: `installed(module)` says whether it is installed, `cuda_capabilities`
    lists the CUDA GPUs' compute capabilities (empty: no CUDA), `import_error(module)` tries the
    import flash-attn needs."""
    found = []
    for name, package, module in SPEEDUPS:
        if not installed(module):
            usable, reason = False, f"not installed (pip install {package})"
        elif not cuda_capabilities:
            usable, reason = False, "no CUDA GPU"
        elif module == "flash_attn" and max(cuda_capabilities) < FLASH_ATTN_CAPABILITY:
            best = ".".join(map(str, max(cuda_capabilities)))
            usable, reason = False, f"needs compute capability 8.0+ (Ampere or newer); the GPU has {best}"
        elif module == "flash_attn" and (error := import_error(module)) is not None:
            usable, reason = False, f"installed but does not import ({error}); reinstall it for this torch"
        else:
            usable, reason = True, f"ok ({package} {package_version(package)})"
        found.append(Speedup(name, package, module, usable, reason))
    return found


def _cuda_devices() -> list[Device]:
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            Device(
                kind="cuda",
                index=index,
                name=props.name,
                memory_gb=round(props.total_memory / GB, 1),
                bf16=props.major >= 8,  # native bf16 from Ampere on (older GPUs only emulate it)
                fp16=(props.major, props.minor) >= (5, 3),
                capability=f"{props.major}.{props.minor}",
                notes=f"{props.multi_processor_count} SMs",
            )
        )
    return devices


def _xpu_devices() -> list[Device]:
    if not torch.xpu.is_available():
        return []
    devices = []
    for index in range(torch.xpu.device_count()):
        props = torch.xpu.get_device_properties(index)
        devices.append(
            Device(
                kind="xpu",
                index=index,
                name=props.name,
                memory_gb=round(props.total_memory / GB, 1),
                bf16=bool(getattr(props, "has_bfloat16_conversions", False)),
                fp16=bool(getattr(props, "has_fp16", True)),
            )
        )
    return devices


def _mps_devices() -> list[Device]:
    if not torch.backends.mps.is_available():
        return []
    # Metal computes bf16 from macOS 14 on (emulated in fp32 on M1/M2, as transformers notes).
    bf16 = torch.backends.mps.is_macos_or_newer(14, 0)
    return [Device(kind="mps", index=0, name="Apple GPU (MPS)", memory_gb=None, bf16=bf16, fp16=True)]


def _cpu_device() -> Device:
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    found = capabilities() if capabilities is not None else {}
    bf16 = cpu_bf16_features()
    fp16 = tuple(name for name in CPU_FP16_FEATURES if found.get(name) is True)
    notes = f"{os.cpu_count() or 1} cores, {torch.backends.cpu.get_cpu_capability()}"
    if bf16 or fp16:
        notes += ", native " + ", ".join(bf16 + fp16)
    ram = ram_total_bytes()
    return Device(
        kind="cpu",
        index=0,
        name=str(found.get("cpu_name") or platform.processor() or platform.machine()),
        memory_gb=round(ram / GB, 1) if ram else None,
        bf16=bool(bf16),
        fp16=bool(fp16),
        notes=notes,
    )


def gather_env() -> EnvReport:
    """Versions, devices and speedups of this machine."""
    cuda = _cuda_devices() if torch.cuda.is_available() else []
    capabilities = [torch.cuda.get_device_capability(device.index) for device in cuda]
    return EnvReport(
        python=platform.python_version(),
        versions={name: package_version(name) for name in PACKAGES},
        torch_cuda=torch.version.cuda,
        devices=[*cuda, *_xpu_devices(), *_mps_devices(), _cpu_device()],
        speedups=check_speedups(
            lambda module: importlib.util.find_spec(module) is not None,
            capabilities,
        ),
    )


def env_tables(report: EnvReport) -> list[Table]:
    """The report as rich tables: versions, devices, speedups."""

    def yes(flag: bool) -> str:
        return "[green]yes[/]" if flag else "[red]no[/]"

    versions = Table(title="versions", title_justify="left")
    versions.add_column("package")
    versions.add_column("version")
    versions.add_row("python", report.python)
    for name, found in report.versions.items():
        label = f"{found} (CUDA {report.torch_cuda})" if name == "torch" and report.torch_cuda else found
        versions.add_row(name, label)

    devices = Table(title="devices (bf16, fp16: native arithmetic)", title_justify="left")
    for column in ("device", "name", "memory", "compute capability", "bf16", "fp16", "notes"):
        devices.add_column(column)
    for device in report.devices:
        memory = f"{device.memory_gb:.1f} GB" if device.memory_gb is not None else "-"
        devices.add_row(
            f"{device.kind}:{device.index}" if device.kind != "cpu" else "cpu",
            device.name,
            memory,
            device.capability or "-",
            yes(device.bf16),
            yes(device.fp16),
            device.notes,
        )

    speedups = Table(title="optional speedups", title_justify="left")
    for column in ("speedup", "usable", "reason"):
        speedups.add_column(column)
    for speedup in report.speedups:
        speedups.add_row(speedup.name, yes(speedup.usable), speedup.reason)
    return [versions, devices, speedups]
