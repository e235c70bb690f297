"""What a benchmark ran on: device, driver and library versions, recorded with every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess

import torch


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(device: torch.device) -> dict:
    """A flat dict of strings and numbers (it also becomes CSV columns)."""
    import dbn_kernels

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "gpu": None,
        "gpu_sms": None,
        "gpu_l2_mib": None,
        "driver": None,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "dbn_kernels": dbn_kernels.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                   gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1),
                   driver=_nvidia_driver())
    return env


def device_name(env: dict) -> str:
    return env["gpu"] or env["cpu"]
