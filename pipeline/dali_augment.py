"""DALI engine for the augmentation spec in `kernels/spec.py`.

The per-sample parameters are drawn once, in torch (`sample_params`), and fed to
DALI through `fn.external_source` next to the uint8 images, so DALI and the
pure-torch reference (`kernels/reference.py`, which defines the result) apply the
very same draws. Nothing random happens inside the pipeline.

Graph, per sample (HWC, C_in = 1 or 3 in, C = out.channels out):

    uint8 (H, W, C_in)    raw pixels, or file bytes -> decoders.image (GRAY or RGB;
                          "mixed" = nvJPEG on a GPU, "cpu" without one)
      -> warp_affine      one bilinear pass: flip + rotate + scale + shift + resize
      -> brightness_contrast, clamp to [0, 255]    (float, 0..255 scale)
      -> coord_transform, clamp    saturation, C_in == 3 only (see below)
      -> cat x3           only when C_in == 1 and out.channels == 3
      -> crop_mirror_normalize   (v - 255 mean) / (255 std), layout HWC, float32/float16
      -> erase            the spec's box, fill 0 (= the mean), after normalising

Sources may differ in size from sample to sample (decoded files): warp_affine takes a
matrix per sample, so each sample's matrix is built for its own (h, w) and every
output is S x S.

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
* Saturation. The spec's v' = l + s (v - l) with l = 0.299 r + 0.587 g + 0.114 b is
  linear in the pixel: v' = M v with M = s I + (1 - s) 1 [0.299, 0.587, 0.114], one
  3x3 matrix per sample for `coord_transform` (exact; DALI's hsv/color_twist use other
  colour models), then the clamp.
* Decoding. `adjust_orientation=False`: Pillow (pack, the CPU loaders) ignores EXIF
  orientation, and the per-sample matrices are built for the file's stored (h, w);
  `jpeg_fancy_upsampling=True` makes nvJPEG ("mixed") upsample chroma as libjpeg-turbo.
  Decoding a colour file to GRAY gives libjpeg's / nvImageCodec's luma, which can differ
  from Pillow's "L" by 1/255 (rounding); gray and RGB outputs of lossless files are exact.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from kernels.reference import LUMA
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

def per_sample_hw(in_hw, n: int) -> np.ndarray:
    """(n, 2) float64 source (h, w) per sample from (H, W), or a (n, 2) per-sample array.

    A trailing channel entry is ignored: (H, W, C) as `images.shape[1:]` gives, or (n, 3) as
    `EncodedPart.shapes` holds.
    """
    hw = np.asarray(in_hw.cpu() if isinstance(in_hw, torch.Tensor) else in_hw, dtype=np.float64)
    if hw.ndim == 1 and hw.shape[0] in (2, 3):
        return np.broadcast_to(hw[:2], (n, 2))
    if hw.ndim == 2 and hw.shape[0] == n and hw.shape[1] in (2, 3):
        return hw[:, :2]
    raise ValueError(f"in_hw must be (H, W) or a ({n}, 2) array of per-sample (h, w), got shape {hw.shape}")


def dali_affine_matrix(params: AugParams, in_hw, size: int) -> np.ndarray:
    """(B, 2, 3) float32 destination -> source matrices in warp_affine's pixel coordinates.

    in_hw: the source (H, W), or a (B, 2) array of each sample's own (h, w).

    The spec's inverse map is u_src = A u_out + c in normalised coordinates. DALI's
    pixel coordinates put (0, 0) at the corner of the first pixel, so
    x_px = (u + 1) * W / 2 on both sides (S for the output, W x H for the source):

        x_src = D_src (A (2 x_out / S - 1) + c + 1),   D_src = diag(W / 2, H / 2)
        =>  M[:, :2] = D_src A (2 / S),   M[:, 2] = D_src (c + 1 - A 1)

    No extra half-pixel offset: DALI already samples at output pixel centres
    (x_out = k + 0.5) and source pixel k sits at k + 0.5, as in grid_sample with
    align_corners=False.
    """
    theta = params.inverse_affine().detach().cpu().double()  # float64 for the conversion
    hw = torch.tensor(per_sample_hw(in_hw, theta.shape[0]))  # a copy: the array may be a read-only broadcast
    lin, c = theta[:, :, :2], theta[:, :, 2]
    half = hw.flip(1) / 2.0  # (B, 2): (w / 2, h / 2)
    m = torch.empty_like(theta)
    m[:, :, :2] = half[:, :, None] * lin * (2.0 / size)
    m[:, :, 2] = half * (c + 1.0 - lin.sum(2))
    return m.float().numpy()


def dali_saturation_matrix(params: AugParams) -> np.ndarray:
    """(B, 3, 3) float32 per-sample `coord_transform` matrices: M = s I + (1 - s) 1 [0.299, 0.587, 0.114]."""
    s = params.saturation.detach().cpu().double().view(-1, 1, 1)
    luma = torch.tensor(LUMA, dtype=torch.float64).view(1, 1, 3)
    return (s * torch.eye(3, dtype=torch.float64) + (1.0 - s) * luma).float().numpy()


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


def dali_param_arrays(params: AugParams, in_hw, out: OutputSpec) -> dict[str, np.ndarray]:
    """The per-sample argument inputs (matrix, jitter, saturation, erase box) for any number of samples.

    in_hw: the source (H, W), or a (B, 2) array of each sample's own (h, w) (encoded files of
    differing sizes); see `per_sample_hw`. The DALI loader converts a whole epoch's draws at
    once and feeds row slices of the result, so no float64 matrix maths runs on the training
    thread per batch.
    """
    params = params.to("cpu")
    anchor, shape = dali_erase_region(params, out.size)
    return {
        "matrix": dali_affine_matrix(params, in_hw, out.size),
        "brightness": params.brightness.float().numpy(),
        "contrast": params.contrast.float().numpy(),
        "erase_anchor": anchor,
        "erase_shape": shape,
        "saturation": dali_saturation_matrix(params),
    }


def encoded_hw(blobs: list) -> np.ndarray:
    """(B, 2) stored (h, w) of each file, read from its header (nothing is decoded)."""
    from pipeline.decode import open_image

    hw = np.empty((len(blobs), 2), np.int64)
    for i, blob in enumerate(blobs):  # header reads only, for AugParams batches; loaders pass shapes
        with open_image(blob) as img:
            hw[i] = img.size[1], img.size[0]
    return hw


def input_names(in_channels: int) -> tuple[str, ...]:
    """The pipeline's external-source inputs, in order (saturation only for colour sources)."""
    return _INPUT_NAMES + (("saturation",) if in_channels == 3 else ())


def dali_inputs(images_u8, params: AugParams | dict[str, np.ndarray], out: OutputSpec,
                encoded: bool = False, in_channels: int | None = None) -> dict[str, np.ndarray]:
    """Everything one batch feeds to the pipeline's external sources, as numpy arrays (or a list).

    images_u8: raw (B, H, W) or (B, H, W, C) uint8 (C in {1, 3}), or with encoded=True a list of
    1-D uint8 arrays, each one file's bytes. `params` is the batch's AugParams, or its rows of
    `dali_param_arrays` (already converted; for encoded files built with each file's (h, w)).
    in_channels: what the pipeline was built for; raw images must have that many channels.
    """
    if encoded:
        images = [np.asarray(b, dtype=np.uint8).reshape(-1) for b in images_u8]
        n, hw = len(images), (encoded_hw(images) if isinstance(params, AugParams) else None)
    else:
        if isinstance(images_u8, torch.Tensor):
            images_u8 = images_u8.detach().cpu().numpy()
        images = np.ascontiguousarray(images_u8)
        channels = images.shape[3] if images.ndim == 4 else 1
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or channels not in (1, 3):
            raise ValueError(f"images must be (B, H, W) or (B, H, W, C) uint8 with C 1 or 3, got {images.dtype} "
                             f"{images.shape}")
        if images.ndim == 3:
            images = images[..., None]  # (B, H, W, 1): HWC per sample
        if in_channels is not None and images.shape[3] != in_channels:
            raise ValueError(f"images have {images.shape[3]} channels but the DALI pipeline was built for "
                             f"in_channels={in_channels}")
        n, hw = images.shape[0], images.shape[1:3]
    arrays = dali_param_arrays(params, hw, out) if isinstance(params, AugParams) else params
    if len(arrays["brightness"]) != n:
        raise ValueError(f"{n} images but {len(arrays['brightness'])} parameter sets")
    return {"images": images, **arrays}


_INPUT_NAMES = ("images", "matrix", "brightness", "contrast", "erase_anchor", "erase_shape")
_INPUT_NDIM = {"images": 3, "matrix": 2, "brightness": 0, "contrast": 0, "erase_anchor": 1, "erase_shape": 1,
               "saturation": 2}


# --------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------

def _dali_dtype(dtype: torch.dtype):
    """DALI output dtype for the requested torch dtype (bfloat16: float32, cast in torch)."""
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def _check_channels(in_channels: int, out: OutputSpec) -> None:
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if in_channels == 3 and out.channels == 1:
        raise ValueError("a 3-channel source cannot give 1-channel output: pack the data with --channels 1 "
                         "(or ask for 3 output channels)")


def augment_graph(images, matrix, brightness, contrast, erase_anchor, erase_shape,
                  out: OutputSpec, on_gpu: bool, saturation=None, encoded: bool = False,
                  in_channels: int = 1):
    """Build the augmentation ops on DataNodes (inside a pipeline definition).

    images: uint8 HWC (C = in_channels) on the CPU, or with encoded=True each sample's file
    bytes (1-D uint8), decoded here; the rest are CPU argument inputs (saturation: the
    per-sample 3x3 matrices, colour only). With on_gpu the images move to (or are decoded
    on) the GPU and every op runs there.
    """
    _check_channels(in_channels, out)
    if encoded:
        # adjust_orientation=False: as Pillow, the stored (h, w) the matrices were built for;
        # jpeg_fancy_upsampling: nvJPEG upsamples chroma as libjpeg-turbo (Pillow, DALI "cpu") does.
        images = fn.decoders.image(images, device="mixed" if on_gpu else "cpu",
                                   output_type=types.GRAY if in_channels == 1 else types.RGB,
                                   adjust_orientation=False, jpeg_fancy_upsampling=True)
    elif on_gpu:
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
    if in_channels == 3:  # saturation: v' = M v per pixel (module docstring), then the clamp
        x = dmath.clamp(fn.coord_transform(x, M=saturation, dtype=types.FLOAT), 0.0, 255.0)
    elif out.channels == 3:  # gray replicated before normalising (per-channel mean/std)
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

# images: (B, H, W[, C]) uint8 or (encoded) a list of file bytes; labels (B,); AugParams or dali_param_arrays rows
Batch = tuple[Any, Any, Any]


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
                  seed: int = 0, prefetch_queue_depth: int = 2, encoded: bool = False,
                  in_channels: int = 1) -> DaliBatchIterator:
    """A PyTorch loader backed by DALI for a Python `source` of (images, labels, params).

    Raw batches: images (B, H, W) or (B, H, W, C) uint8 with C == in_channels. encoded=True:
    images is a list of 1-D uint8 arrays (file bytes: JPEG, PNG, ...), decoded by DALI to
    in_channels (GRAY or RGB; on the GPU with "mixed" where device_id is given), each of any
    size; their params, when precomputed, come from `dali_param_arrays` with each file's (h, w)
    (an AugParams batch has the sizes read from the file headers).

    `source` is a re-iterable collection (a list, or an object whose `__iter__` starts
    a new epoch) or a zero-argument callable returning one epoch's iterator; each batch
    holds at most batch_size samples (the last may be smaller). DALI polls it ahead of
    use (prefetch_queue_depth), so keep the source cheap or make it prefetch itself.
    Images come back on the CPU (device_id=None) or on cuda:device_id, labels with them.
    """
    _require_dali()
    _check_channels(in_channels, out)
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    names = input_names(in_channels)

    def epoch():  # a generator function: DALI calls it again for every epoch
        for images, labels, params in (source() if callable(source) else source):
            arrays = dali_inputs(images, params, out, encoded=encoded, in_channels=in_channels)
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            arrays["labels"] = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1, 1)
            yield tuple(arrays[name] for name in (*names, "labels"))

    on_gpu = device_id is not None
    ndim = [1 if encoded and name == "images" else _INPUT_NDIM[name] for name in names]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch_queue_depth)
    def loader_pipeline():
        *nodes, labels = fn.external_source(
            source=epoch, num_outputs=len(names) + 1, batch=True, cycle="raise",
            ndim=[*ndim, 1], layout=[None if encoded else "HWC"],
            dtype=[types.UINT8] + [types.FLOAT] * (len(names) - 1) + [types.INT64])
        inputs = dict(zip(names, nodes))
        images = augment_graph(**inputs, out=out, on_gpu=on_gpu, encoded=encoded, in_channels=in_channels)
        return images, (labels.gpu() if on_gpu else labels)

    pipe = loader_pipeline()
    pipe.build()
    dali_iter = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=True,
                                    last_batch_policy=LastBatchPolicy.PARTIAL)
    return DaliBatchIterator(dali_iter, out)


__all__ = ["per_sample_hw", "dali_affine_matrix", "dali_saturation_matrix", "dali_erase_region",
           "dali_param_arrays", "encoded_hw", "input_names", "dali_inputs", "augment_graph", "DaliBatchIterator",
           "dali_iterator"]
