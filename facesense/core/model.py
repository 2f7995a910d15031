"""The network: any timm model, sized for FER2013 (1 or 3 channels, the manifest's classes).

Starting weights: random (default), timm's ImageNet weights (`--pretrained`, which fails
fast with a clear message when they are neither cached nor downloadable), or a local
state dict (`--weights PATH`) whose stem is adapted to the channel count (RGB kernels
summed for gray) and whose head is re-initialised when the classes differ.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import torch
from torch import nn

from facesense.core.errors import FaceSenseError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile


def create_model(name: str, channels: int, num_classes: int, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pretrained: bool = False, weights: str | None = None,
                 zero_init: bool = False) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise FaceSenseError(f"--model {name!r}: not a timm model (list them with timm.list_models())")
    kwargs = dict(in_chans=channels, num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained:
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": _pretrained_file(name)}
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as exc:  # e.g. a network without drop-path
        raise FaceSenseError(f"--model {name}: cannot be built with {kwargs} ({exc})") from exc
    if weights:
        load_weights(model, weights)
    elif zero_init and not pretrained:
        zero_init_residuals_and_head(model)
    return model


def zero_init_residuals_and_head(model: nn.Module) -> None:
    """Start every residual branch and the classifier at zero.

    Measured on FER2013 (48 px, AdamW 2e-3, batch 128): with timm's init EfficientNet-B0
    starts at loss ~3 (logits far too large) and is still at chance after 150 steps;
    zeroing the last norm of each residual branch (each block starts as the identity)
    and the head starts it at ln(7) and above chance within those 150 steps.
    """
    for module in model.modules():
        if getattr(module, "has_skip", False):  # timm's residual blocks (EfficientNet, MobileNet)
            norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if norms and norms[-1].weight is not None:
                nn.init.zeros_(norms[-1].weight)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def _pretrained_file(name: str) -> str:
    """A local file with timm's ImageNet weights for `name`, fetched if reachable; else a clear error.

    Resolving the file here (instead of letting timm try) turns minutes of download
    retries on an offline machine into an immediate message.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise FaceSenseError(f"--pretrained: timm has no pretrained weights for {name}; "
                             f"train from scratch or pass --weights PATH")
    if cfg.file:
        return cfg.file
    hint = (f"fetch them once on a machine with internet (timm.create_model('{name}', pretrained=True) "
            f"fills the cache, ~/.cache/huggingface or ~/.cache/torch), or pass --weights PATH "
            f"with a local state dict")
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return cached
        if not _reachable("huggingface.co"):
            raise FaceSenseError(f"--pretrained: {name} weights ({cfg.hf_hub_id}) are not cached and "
                                 f"huggingface.co is unreachable (offline?); {hint}")
        try:
            return hf_hub_download(cfg.hf_hub_id, "model.safetensors")
        except Exception as exc:  # any hub/network failure: one clear message
            raise FaceSenseError(f"--pretrained: could not download {cfg.hf_hub_id}: {exc}; {hint}") from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
    if cached.is_file():
        return str(cached)
    host = cfg.url.split("/")[2]
    if not _reachable(host):
        raise FaceSenseError(f"--pretrained: {name} weights are not cached and {host} is unreachable "
                             f"(offline?); {hint}")
    try:
        torch.hub.download_url_to_file(cfg.url, str(cached))
    except Exception as exc:
        raise FaceSenseError(f"--pretrained: could not download {cfg.url}: {exc}; {hint}") from exc
    return str(cached)


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within `timeout` (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo itself has no timeout
    thread.start()
    thread.join(timeout + 1)
    return bool(ok)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain, wrapped ({'state_dict'|'model': ...}) or a FaceSense checkpoint."""
    from facesense.core.checkpoint import torch_load

    try:
        obj = torch_load(path, "state dict")
    except FaceSenseError as exc:
        raise FaceSenseError(f"--weights {exc}") from exc
    if isinstance(obj, dict) and obj.get("format") == "facesense-checkpoint":
        obj = obj["ema"] or obj["model"]
    elif isinstance(obj, dict):
        obj = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FaceSenseError(f"--weights {path}: expected a dict of tensors (a state dict)")
    return {_strip(k): v for k, v in obj.items()}


def _strip(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict: stem adapted to the channel count, mismatched head left fresh."""
    from timm.models import adapt_input_conv

    state = read_state_dict(path)
    own = model.state_dict()
    first_conv = model.pretrained_cfg.get("first_conv")
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def in_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in heads)

    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise FaceSenseError(f"--weights {path}: keys this {model.default_cfg.get('architecture')} does "
                             f"not have: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''} "
                             f"(weights for another model?)")
    for key, value in list(state.items()):
        if value.shape == own[key].shape:
            continue
        if first_conv and key == f"{first_conv}.weight" and value.dim() == 4:
            state[key] = adapt_input_conv(own[key].shape[1], value)  # RGB summed for gray
        elif in_head(key):
            del state[key]  # other classes: keep the model's fresh head
        else:
            raise FaceSenseError(f"--weights {path}: {key} is {tuple(value.shape)}, the model's is "
                                 f"{tuple(own[key].shape)} (weights for another model?)")
    missing = [k for k in own if k not in state and not in_head(k)]
    if missing:
        raise FaceSenseError(f"--weights {path}: missing {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False)


def check_input_size(model: nn.Module, channels: int, img_size: int, name: str) -> None:
    """One eval-mode forward of a single zero image on the model's own device: a clear error, before
    training starts, for an input size the network cannot take (too small for its downsampling)."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, img_size, img_size, device=param.device, dtype=param.dtype))
    except Exception as exc:
        raise FaceSenseError(f"--img-size {img_size}: {name} cannot take {img_size}x{img_size} inputs "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    finally:
        model.train(was_training)
