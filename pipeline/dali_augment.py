"""DALI engine for the augmentation spec in `kernels/spec.py`.

The per-sample parameters are drawn once, in torch (`sample_params`), and fed to
DALI through `fn.external_source` next to the uint8 images, so DALI and the
pure-torch reference (`kernels/reference.py`, which defines the result) apply the
very same draws. Nothing random happens inside the pipeline.

Graph, per sample (HWC, C = 1 in, C = out.channels out):

    uint8 (48, 48, 1)
      -> warp_affine      one bilinear pass: flip + rotate + scale + shift + resize
      -> brightness_contrast, clamp to [0, 255]    (float, 0..255 scale)
      -> cat x3           only when out.channels == 3
      -> crop_mirror_normalize   (v - 255 mean) / (255 std), layout HWC, float32/float16
      -> erase            the spec's box, fill 0 (= the mean), after normalising

Where DALI's conventions differ from the spec, and how they are made to agree:

* Coordinates. The spec works in normalised coordinates, [-1, 1] from the outer
  edge of the first pixel to the outer edge of the last (torch, align_corners=False).
  `warp_affine` works in pixels with (0, 0) at the *corner* of the first pixel, so
  pixel k has its centre at k + 0.5, and it evaluates the map at output pixel
  centres. Measured (DALI 2.4 CPU): with  x_px = (u + 1) * W / 2  on both sides
  (no extra half-pixel shift) DALI and grid_sample agree to 0.04/255; adding or
  subtracting 0.5 px to the translation gives errors of ~160/255. See
  `dali_affine_matrix`.
* Rotation direction. Both use y pointing down; the spec's `inverse_affine`
  already holds the destination -> source map with the spec's sign (positive =
  counter-clockwise on screen), and we pass it with `inverse_map=True`, so DALI
  never inverts or re-derives an angle: no sign to get wrong.
* Border fill. `fill_value=None` makes warp_affine clamp source coordinates and
  repeat the border pixel, which is grid_sample's padding_mode="border".
* Interpolation. `INTERP_LINEAR` is bilinear between the four nearest source
  pixel centres, as grid_sample(mode="bilinear").
* Intensity range. DALI keeps the 0..255 scale of the uint8 input in float, so
  the spec's [0, 1] constants are scaled by 255: contrast centre 127.5, clamp to
  [0, 255], mean and std times 255. Brightness is a pure gain (shift 0).
* dtype. DALI has no bfloat16: for bfloat16 the pipeline produces float32 and
  torch casts it (float16 is produced by DALI directly).
* Layout. DALI's HWC batch (B, S, S, C) viewed as (B, C, S, S) by a permute *is*
  torch's channels-last memory format, so no copy is needed to get there.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from kernels.spec import AugParams, OutputSpec, erase_box

try:  # the module imports without DALI; using it raises a clear error
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath
    _DALI_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only where DALI is absent
    fn = pipeline_def = types = dmath = None
    _DALI_IMPORT_ERROR = exc

_INSTALL_HINT = "nvidia-dali is not installed: pip install nvidia-dali-cuda130"


def _require_dali() -> None:
    if _DALI_IMPORT_ERROR is not None:
        raise ImportError(_INSTALL_HINT) from _DALI_IMPORT_ERROR


# --------------------------------------------------------------------------------------
# Parameters: spec (normalised coordinates, [0, 1] fractions) -> DALI (pixels)
# --------------------------------------------------------------------------------------

def dali_affine_matrix(params: AugParams, in_hw: tuple[int, int], size: int) -> np.ndarray:
    """(B, 2, 3) float32 destination -> source matrices in warp_affine's pixel coordinates.

    The spec's inverse map is u_src = A u_out + c in normalised coordinates. DALI's
    pixel coordinates put (0, 0) at the corner of the first pixel, so
    x_px = (u + 1) * W / 2 on both sides (S for the output, W x H for the source):

        x_src = D_src (A (2 x_out / S - 1) + c + 1),   D_src = diag(W / 2, H / 2)
        =>  M[:, :2] = D_src A (2 / S),   M[:, 2] = D_src (c + 1 - A 1)

    No extra half-pixel offset: DALI already samples at output pixel centres
    (x_out = k + 0.5) and source pixel k sits at k + 0.5, as in grid_sample with
    align_corners=False.
    """
    h, w = in_hw
    theta = params.inverse_affine().detach().cpu().double()  # float64 for the conversion
    lin, c = theta[:, :, :2], theta[:, :, 2]
    half = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    m = torch.empty_like(theta)
    m[:, :, :2] = half[None, :, None] * lin * (2.0 / size)
    m[:, :, 2] = half[None, :] * (c + 1.0 - lin.sum(2))
    return m.float().numpy()


def dali_erase_region(params: AugParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample `fn.erase` arguments for axis_names="HW": anchor (y0, x0), shape (h, w).

    The box is exactly the spec's `erase_box` (integer pixels); samples that are not
    erased get a zero-area box (shape (0, 0)), which fn.erase leaves untouched, so one
    pipeline serves every batch without a separate mask input.
    """
    box = erase_box(params.to("cpu"), size).to(torch.float32)  # (B, 4): x0, y0, x1, y1
    anchor = torch.stack([box[:, 1], box[:, 0]], 1)
    shape = torch.stack([box[:, 3] - box[:, 1], box[:, 2] - box[:, 0]], 1).clamp(min=0)
    return anchor.numpy(), shape.numpy()


def dali_param_arrays(params: AugParams, in_hw: tuple[int, int], out: OutputSpec) -> dict[str, np.ndarray]:
    """The per-sample argument inputs (matrix, jitter, erase box) for any number of samples.

    The DALI loader converts a whole epoch's draws at once and feeds row slices of the
    result, so no float64 matrix maths runs on the training thread per batch.
    """
    params = params.to("cpu")
    anchor, shape = dali_erase_region(params, out.size)
    return {
        "matrix": dali_affine_matrix(params, in_hw, out.size),
        "brightness": params.brightness.float().numpy(),
        "contrast": params.contrast.float().numpy(),
        "erase_anchor": anchor,
        "erase_shape": shape,
    }


def dali_inputs(images_u8: np.ndarray | torch.Tensor, params: AugParams | dict[str, np.ndarray],
                out: OutputSpec) -> dict[str, np.ndarray]:
    """Everything one batch feeds to the pipeline's external sources, as numpy arrays.

    `params` is the batch's AugParams, or its rows of `dali_param_arrays` (already converted).
    """
    if isinstance(images_u8, torch.Tensor):
        images_u8 = images_u8.detach().cpu().numpy()
    images = np.ascontiguousarray(images_u8)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be (B, H, W) uint8, got {images.dtype} {images.shape}")
    arrays = dali_param_arrays(params, images.shape[1:], out) if isinstance(params, AugParams) else params
    if len(arrays["brightness"]) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(arrays['brightness'])} parameter sets")
    return {"images": images[..., None], **arrays}  # images (B, H, W, 1): HWC per sample


_INPUT_NAMES = ("images", "matrix", "brightness", "contrast", "erase_anchor", "erase_shape")
_INPUT_NDIM = (3, 2, 0, 0, 1, 1)


# --------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------

def _dali_dtype(dtype: torch.dtype):
    """DALI output dtype for the requested torch dtype (bfloat16: float32, cast in torch)."""
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def augment_graph(images, matrix, brightness, contrast, erase_anchor, erase_shape,
                  out: OutputSpec, on_gpu: bool):
    """Build the augmentation ops on DataNodes (inside a pipeline definition).

    images: uint8 HWC (C = 1) on the CPU; the rest are CPU argument inputs. With
    on_gpu the images move to the GPU and every op runs there.
    """
    if on_gpu:
        images = images.gpu()
    # One inverse affine map per sample, one bilinear pass, straight to S x S. Not the
    # chain flip -> rotate -> resize: every step of a chain resamples (and blurs) the
    # image again, while one dst -> src map per sample is exactly what the reference
    # computes with affine_grid + grid_sample, so the two agree to rounding.
    x = fn.warp_affine(images, matrix=matrix, size=(out.size, out.size), inverse_map=True,
                       fill_value=None,  # None: clamp coordinates = grid_sample "border"
                       interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
    # Spec on [0, 1]: clamp(b * (0.5 + c (x - 0.5)), 0, 1). Here x is on 0..255 floats,
    # so the contrast centre is 127.5; brightness is a gain (brightness_shift = 0).
    x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast,
                               contrast_center=127.5, brightness_shift=0.0,
                               dtype=types.FLOAT)
    x = dmath.clamp(x, 0.0, 255.0)
    if out.channels == 3:  # gray replicated before normalising (per-channel mean/std)
        x = fn.cat(x, x, x, axis_name="C")
    mean, std = out.channel_stats()
    x = fn.crop_mirror_normalize(x, mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                 output_layout="HWC", dtype=_dali_dtype(out.dtype))
    # Random erasing after normalisation, fill 0 (the mean in every channel). A
    # zero-area box per sample means "do not erase" (see dali_erase_region).
    x = fn.erase(x, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=0.0)
    return x


# --------------------------------------------------------------------------------------
# Loader: DALI's PyTorch iterator over a Python source of (images, labels, params)
# --------------------------------------------------------------------------------------

Batch = tuple[Any, Any, Any]  # images (B, H, W) uint8, labels (B,), AugParams or dali_param_arrays rows


class DaliBatchIterator:
    """Wraps `DALIGenericIterator`; yields (images (B, C, S, S) channels-last, labels int64).

    Each `iter()` is one epoch over `source`; the DALI iterator resets itself at the end.
    """

    def __init__(self, dali_iter, out: OutputSpec):
        self.dali_iter, self.out = dali_iter, out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (data,) in self.dali_iter:
            images = data["images"].permute(0, 3, 1, 2)  # NHWC memory = channels-last NCHW
            images = images.to(dtype=self.out.dtype, memory_format=torch.channels_last)
            yield images, data["labels"].reshape(-1).long()


def dali_iterator(source: Iterable[Batch] | Callable[[], Iterable[Batch]], out: OutputSpec,
                  batch_size: int, device_id: int | None = None, num_threads: int = 2,
                  seed: int = 0, prefetch_queue_depth: int = 2) -> DaliBatchIterator:
    """A PyTorch loader backed by DALI for a Python `source` of (images, labels, params).

    `source` is a re-iterable collection (a list, or an object whose `__iter__` starts
    a new epoch) or a zero-argument callable returning one epoch's iterator; each batch
    holds at most batch_size samples (the last may be smaller). DALI polls it ahead of
    use (prefetch_queue_depth), so keep the source cheap or make it prefetch itself.
    Images come back on the CPU (device_id=None) or on cuda:device_id, labels with them.
    """
    _require_dali()
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    def epoch():  # a generator function: DALI calls it again for every epoch
        for images, labels, params in (source() if callable(source) else source):
            arrays = dali_inputs(images, params, out)
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            arrays["labels"] = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1, 1)
            yield tuple(arrays[name] for name in (*_INPUT_NAMES, "labels"))

    on_gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch_queue_depth)
    def loader_pipeline():
        *nodes, labels = fn.external_source(
            source=epoch, num_outputs=len(_INPUT_NAMES) + 1, batch=True, cycle="raise",
            ndim=[*_INPUT_NDIM, 1], layout=["HWC"],
            dtype=[types.UINT8] + [types.FLOAT] * (len(_INPUT_NAMES) - 1) + [types.INT64])
        images = augment_graph(*nodes, out=out, on_gpu=on_gpu)
        return images, (labels.gpu() if on_gpu else labels)

    pipe = loader_pipeline()
    pipe.build()
    dali_iter = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=True,
                                    last_batch_policy=LastBatchPolicy.PARTIAL)
    return DaliBatchIterator(dali_iter, out)


__all__ = ["dali_affine_matrix", "dali_erase_region", "dali_param_arrays", "dali_inputs", "augment_graph",
           "DaliBatchIterator", "dali_iterator"]
