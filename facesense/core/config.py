"""`facesense train` configuration: one typed dataclass, a help text per field.

Each field's help (`opt(default, help)`, kept in the field's metadata) *is* its `--help`
text: the CLI builds one option per field from this class, so every option shows in
`--help` and a config file may set any of them. Precedence: field default < config file (TOML or YAML) < command line.
Options that default to the data (channels, img_size: None) are filled in from the manifest when a
run starts (`for_data`); that resolved config, real numbers only, is stored in every checkpoint as a
plain dict.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from facesense.core.errors import FaceSenseError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package (see pyproject.toml)
    import tomli as tomllib

CHOICES = {
    "loader": ("auto", "resident", "stream", "dali", "dataloader"),
    "channels": (None, 1, 3),
    "optimizer": ("adamw", "sgd"),
    "class_weights": ("balanced", "none"),
    "amp_dtype": ("bfloat16", "float16"),
    "cpu_augment": ("compiled", "reference"),
    "resume": ("no", "yes", "auto"),
}

# Options given on the command line as a flag that may take a value: `--resume` alone means `--resume yes`.
FLAG_VALUES = {"resume": "yes"}

# Fields a resumed run may change; any other difference from the checkpoint's config is an error.
RESUME_MAY_DIFFER = frozenset({"data", "out", "loader", "workers", "device", "compile", "cpu_augment",
                               "deterministic", "log_every", "save_every", "max_steps", "resume", "overwrite",
                               "tensorboard", "resident_budget_gb"})


def opt(default, help: str):
    """A config field with its --help text (every field has one: the CLI and config files rely on it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data and output
    data: str = opt("data/shards", "packed shards (facesense pack): trains on train, selects on val, never reads "
                                   "test")
    out: str = opt("model", "output directory: last.pt, best.pt, metrics.jsonl, training_curves.png")
    loader: str = opt("auto", "data loader: auto (resident when the split's decoded pixels fit "
                              "--resident-budget-gb, else stream), resident (decoded once, kept on the device), "
                              "stream (decoded batch by batch, overlapped with the step), dali, or dataloader "
                              "(the per-image PIL baseline)")
    workers: int = opt(2, "loader worker processes (dataloader) or threads (dali)")
    resident_budget_gb: float = opt(0.0, "memory budget for resident splits, GB; 0 = auto: half of the free device "
                                         "memory. Splits whose decoded pixels fit stay resident, others stream")
    soft_labels: bool = opt(False, "train on the FER+ vote distribution (cross-entropy against the normalised "
                                   "votes, Barsoum et al. 2016 'crossentropy' mode); needs shards packed with "
                                   "--ferplus. Val and eval still score the majority label")
    # model
    model: str = opt("efficientnet_b0", "any timm model name")
    channels: int | None = opt(None, "model input channels: default the data's (1 gray, 3 colour); 3 on gray "
                                     "data replicates the gray")
    pretrained: bool = opt(False, "start from timm's ImageNet weights (cached or downloadable); fails fast otherwise")
    weights: str | None = opt(None, "local timm/PyTorch state dict to start from; stem and head are adapted")
    drop_rate: float = opt(0.2, "dropout before the classifier")
    drop_path_rate: float = opt(0.0, "stochastic depth (drop-path) rate")
    zero_init: bool = opt(True, "random init only: zero each residual branch's last norm and the head (learns from "
                                "step 1)")
    # input and augmentation (drawn per sample on the device; see kernels/spec.py)
    img_size: int | None = opt(None, "network input side; default the data's own when its images are square "
                                     "(FER2013 48, RAF-DB 100); other sizes are resampled inside the augmentation")
    norm_mean: float = opt(0.5, "normalisation mean on the [0, 1] scale (all channels)")
    norm_std: float = opt(0.25, "normalisation std on the [0, 1] scale (all channels)")
    aug_flip_p: float = opt(0.5, "probability of a horizontal flip")
    aug_max_angle: float = opt(15.0, "rotation drawn from U(-a, a) degrees")
    aug_scale_min: float = opt(0.9, "smallest zoom factor")
    aug_scale_max: float = opt(1.1, "largest zoom factor")
    aug_max_shift: float = opt(0.1, "shift drawn from U(-s, s), fraction of the image side")
    aug_brightness: float = opt(0.2, "brightness gain drawn from U(1 - b, 1 + b)")
    aug_contrast: float = opt(0.2, "contrast factor drawn from U(1 - c, 1 + c)")
    aug_saturation: float = opt(0.2, "saturation factor drawn from U(1 - s, 1 + s); colour sources only (no "
                                     "effect on gray)")
    aug_erase_p: float = opt(0.0, "probability of random erasing")
    # optimisation
    epochs: int = opt(25, "passes over the training split")
    batch_size: int = opt(128, "images per step per rank")
    optimizer: str = opt("adamw", "adamw, or sgd (Nesterov momentum)")
    lr: float = opt(2e-3, "peak learning rate, reached after the warm-up")
    min_lr_ratio: float = opt(0.01, "cosine annealing ends at lr * min_lr_ratio")
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs (fractions allowed)")
    weight_decay: float = opt(0.05, "decoupled weight decay; biases and norm weights are exempt")
    momentum: float = opt(0.9, "SGD momentum")
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing")
    class_weights: str = opt("none", "cross-entropy class weights: balanced (n / (k * count)) or none")
    ema: bool = opt(False, "keep an exponential moving average of the weights; validate and select with it")
    ema_decay: float = opt(0.999, "EMA decay per step (ramped up over the first steps)")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this; 0 = off")
    # speed
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N; under torchrun each rank uses "
                              "cuda:LOCAL_RANK")
    amp: bool | None = opt(None, "mixed precision autocast; default: on for CUDA, off on CPU (slower there)")
    amp_dtype: str = opt("bfloat16", "autocast dtype: bfloat16 (float16 on GPUs without native bfloat16) or float16 "
                                     "(with a GradScaler on CUDA)")
    compile: bool | None = opt(None, "torch.compile the model; default: on for CUDA")
    cpu_augment: str = opt("compiled", "augmentation engine of the resident loader on CPU: compiled (kernels/"
                                       "cpu_fused.py under torch.compile, the faster measured) or reference (plain "
                                       "torch, no compile)")
    channels_last: bool = opt(True, "channels-last memory format for the model and batches")
    deterministic: bool = opt(False, "deterministic kernels (slower on GPU) for bit-exact reruns and resumes")
    # run control
    seed: int = opt(0, "seeds model init, shuffling, augmentation and dropout: same seed, same run")
    max_steps: int = opt(0, "stop after this many optimizer steps in all (smoke runs, benchmarks); 0 = no limit")
    log_every: int = opt(50, "steps between progress updates (the only host syncs in an epoch)")
    save_every: int = opt(0, "also write last.pt every this many steps (mid-epoch resume); 0 = epoch ends only")
    resume: str = opt("no", "--resume: continue the run in --out from its last.pt (same config and data "
                            "required); --resume auto: continue it when last.pt exists, else start a new run "
                            "(implied under a torchrun restart); no: start a new run")
    tensorboard: bool = opt(True, "rank 0 writes TensorBoard curves into --out/tensorboard/ (metrics.jsonl stays the "
                                  "record)")
    overwrite: bool = opt(False, "start afresh even if --out already holds a run")

    def __post_init__(self):
        if isinstance(self.resume, bool):  # configs and checkpoints from before `--resume auto`
            self.resume = "yes" if self.resume else "no"
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise FaceSenseError(f"--{_flag(name)} {getattr(self, name)!r}: expected one of "
                                     f"{', '.join(str(a) for a in allowed if a is not None)}")
        positive = ("epochs", "batch_size", "lr", "norm_std", "log_every", "ema_decay")
        non_negative = ("workers", "drop_rate", "drop_path_rate", "min_lr_ratio", "warmup_epochs",
                        "weight_decay", "momentum", "label_smoothing", "grad_clip", "max_steps", "save_every",
                        "seed", "resident_budget_gb")
        bad = [n for n in positive if not getattr(self, n) > 0] + \
              [n for n in non_negative if not getattr(self, n) >= 0]
        if bad:
            raise FaceSenseError("; ".join(f"--{_flag(n)} {getattr(self, n)}: must be "
                                           f"{'positive' if n in positive else 'zero or more'}" for n in bad))
        if self.img_size is not None and not 8 <= self.img_size <= 1024:
            raise FaceSenseError(f"--img-size {self.img_size}: must be between 8 and 1024 pixels")
        if not (self.ema_decay < 1 and self.drop_rate < 1 and self.drop_path_rate < 1
                and self.label_smoothing < 1 and self.min_lr_ratio <= 1):
            raise FaceSenseError("--ema-decay, --drop-rate, --drop-path-rate and --label-smoothing must be "
                                 "below 1, --min-lr-ratio at most 1")
        if self.pretrained and self.weights:
            raise FaceSenseError("--pretrained and --weights both choose starting weights; pass one")
        if self.resume != "no" and self.overwrite:
            raise FaceSenseError("--resume continues the run in --out, --overwrite replaces it; pass one")
        self.aug()  # AugConfig checks its own ranges

    def aug(self):
        """The augmentation ranges as the kernels' AugConfig."""
        from kernels.spec import AugConfig

        try:
            return AugConfig(flip_p=self.aug_flip_p, max_angle=self.aug_max_angle,
                             scale=(self.aug_scale_min, self.aug_scale_max), max_shift=self.aug_max_shift,
                             brightness=self.aug_brightness, contrast=self.aug_contrast,
                             saturation=self.aug_saturation, erase_p=self.aug_erase_p)
        except ValueError as exc:
            raise FaceSenseError(f"augmentation options: {exc}") from exc

    def to_dict(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_types() -> dict[str, type]:
    """Field name -> its type, with `X | None` reported as X."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: next(a for a in typing.get_args(hints[f.name]) if a is not type(None))
            if typing.get_args(hints[f.name]) else hints[f.name] for f in fields(TrainConfig)}


def field_help() -> dict[str, str]:
    """Field name -> its --help text (from the field's metadata)."""
    return {f.name: f.metadata["help"] for f in fields(TrainConfig)}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(name: str, value, where: str):
    """Check one value against the field's type; ints are accepted for floats."""
    want = field_types()[name]
    if name in FLAG_VALUES and isinstance(value, bool):  # `resume = true` in a config file
        return FLAG_VALUES[name] if value else "no"
    nullable = next(f for f in fields(TrainConfig) if f.name == name).default is None
    if value is None and nullable:
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads `lr: 1e-3` as a string: no dot, no exponent sign
    if want is float and isinstance(value, float) and not math.isfinite(value):
        raise FaceSenseError(f"{where}: {name} = {value!r} should be a finite number")
    if want is str and isinstance(value, Path):
        return str(value)
    if type(value) is not want:
        raise FaceSenseError(f"{where}: {name} = {value!r} should be {want.__name__}")
    return value


def load_config_file(path: Path | str) -> dict:
    """Read a TOML or YAML config file into {field: value}; unknown keys are errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FaceSenseError(f"--config {path}: cannot read ({exc.strerror})") from exc
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise FaceSenseError(f"--config {path}: expected a .toml, .yaml or .yml file")
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise FaceSenseError(f"--config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise FaceSenseError(f"--config {path}: expected a table of option = value")
    names = {f.name for f in fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise FaceSenseError(f"--config {path}: unknown option {key!r} (see facesense train --help)")
        values[name] = _coerce(name, value, f"--config {path}")
    return values


def resolve_config(config_file: Path | str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the config file, then `overrides` (the options given on the command line)."""
    values = load_config_file(config_file) if config_file else {}
    for name, value in (overrides or {}).items():
        values[name] = _coerce(name, value, "command line")
    return TrainConfig(**values)


def config_from_dict(values: dict, where: str) -> TrainConfig:
    """A TrainConfig from a checkpoint's stored dict; refuses fields this version does not know."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FaceSenseError(f"{where}: config has options this FaceSense does not know: {', '.join(unknown)}")
    return TrainConfig(**{k: _coerce(k, v, where) for k, v in values.items()})


def resume_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """`--option saved -> now` for every option a resumed run may not change. An option the saved config
    lacks (it predates the option) had its default's effect: it is compared as the default."""
    now = cfg.to_dict()
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return [f"--{_flag(k)} {saved.get(k, defaults[k])!r} -> {now[k]!r}" for k in now
            if k not in RESUME_MAY_DIFFER and saved.get(k, defaults[k]) != now[k]]


def for_data(cfg: TrainConfig, manifest: dict) -> TrainConfig:
    """`cfg` with what defaults to the data taken from the manifest's train split: channels (the split's own)
    and img_size (its side, when its images are square). The resolved config, real numbers only, is what
    runs, what resume compares and what checkpoints record. One-line errors for what the data cannot give."""
    train = manifest["splits"]["train"]
    source = int(train.get("channels", 1))
    shape = train.get("image_shape")
    if cfg.soft_labels and not manifest.get("votes"):
        raise FaceSenseError(f"--soft-labels: {cfg.data} holds no FER+ vote counts; pack it with them: "
                             f"facesense pack fer2013.csv --ferplus fer2013new.csv --out {cfg.data}")
    channels = source if cfg.channels is None else cfg.channels
    if channels < source:
        raise FaceSenseError(f"--channels {channels}: {cfg.data} holds colour (RGB) images; drop --channels to "
                             f"train on colour, or pack the source with --channels 1 for a gray model")
    img_size = cfg.img_size
    if img_size is None:
        if not shape or shape[0] != shape[1]:
            what = f"{shape[0]}x{shape[1]} (height x width)" if shape else "of differing sizes (encoded)"
            raise FaceSenseError(f"{cfg.data}: the train images are {what}, so the network input side cannot be "
                                 f"taken from them; pass --img-size N (they are resampled to N x N)")
        img_size = int(shape[0])
        if not 8 <= img_size <= 1024:
            raise FaceSenseError(f"{cfg.data}: the train images are {img_size} px, outside the 8-1024 an input "
                                 f"side may be; pass --img-size N")
    return dataclasses.replace(cfg, channels=channels, img_size=img_size)


def source_record(manifest: dict, img_size: int) -> dict:
    """What a model trained on this data takes as a face: the train split's image shape [H, W] (images of
    differing sizes are decoded to img_size x img_size) and channels. Stored in checkpoints and exports."""
    train = manifest["splits"]["train"]
    shape = train.get("image_shape") or [img_size, img_size]
    return {"image_shape": [int(shape[0]), int(shape[1])], "channels": int(train.get("channels", 1))}
