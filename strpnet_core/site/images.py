"""Checked reading of one NIfTI image: every defect becomes an :class:`ImageDefect` with a one-line reason.

ITK's NIfTI reader (SimpleITK 2.5, ITK 5.4) silently zero-fills a truncated file (``.nii`` and ``.nii.gz`` alike)
and silently reads NaN/inf voxels as 0, so the bytes are checked here before SimpleITK reads the voxels: an
uncompressed file must be at least as long as its header says; the (decompressed) byte stream is read in bounded
chunks, nothing kept: gzip CRC, length and end-of-stream verified, floating-point voxels checked for NaN/inf.
The volume itself is then loaded once, by ``SimpleITK.ReadImage``, and inspected through a view in slabs, so
memory stays at one image plus one slab.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Geometry tolerances when two images must share a voxel grid (NIfTI stores geometry in float32).
SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 1e-2  # fraction of the smallest voxel size
DIRECTION_ATOL = 1e-3
_CHUNK = 1 << 20
_SLAB_VOXELS = 1 << 22


class ImageDefect(Exception):
    """A defective image file.

    Attributes
    ----------
    path:
        The file.
    reason:
        One line saying what is wrong.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of a 3D image (voxels not read).

    Attributes
    ----------
    size:
        Voxels along x, y, z (ITK order).
    spacing, origin:
        Millimetres, LPS physical space.
    direction:
        Row-major 3x3 direction cosines.
    pixel_type:
        SimpleITK pixel type string, e.g. ``"32-bit float"``.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_type: str

    @classmethod
    def of(cls, image: sitk.Image) -> ImageInfo:
        """The geometry of an in-memory image."""
        return cls(
            tuple(image.GetSize()),
            tuple(image.GetSpacing()),
            tuple(image.GetOrigin()),
            tuple(image.GetDirection()),
            image.GetPixelIDTypeAsString(),
        )


def compact_sitk_error(exc: BaseException, path: str | os.PathLike[str] | None = None) -> str:
    """Reduce a SimpleITK exception to one line: drop the C++ source location and shorten the file path."""
    text = str(exc).strip()
    if "ERROR:" in text:
        text = text.rsplit("ERROR:", 1)[1]
    text = re.sub(r"\s+", " ", text).strip()
    if path is not None:
        text = text.replace(str(path), Path(path).name)
    return text[:200] or type(exc).__name__


def _check_file(path: Path) -> os.stat_result:
    """Stat ``path`` following symlinks; a missing file, a loop, a dangling link or a non-file is a defect."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageDefect(path, "symlink loop") from None
        if path.is_symlink():
            raise ImageDefect(path, f"broken symlink to {os.readlink(path)}") from None
        if exc.errno == errno.ENOENT:
            raise ImageDefect(path, "file missing") from None
        raise ImageDefect(path, f"cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageDefect(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDefect(path, "empty file (0 bytes)")
    return st


@dataclass(frozen=True)
class _Layout:
    """Where the voxels of a NIfTI file lie (from its header)."""

    offset: int
    nbytes: int
    float_dtype: np.dtype | None  # set for floating-point voxels (checked for NaN/inf)


#: NIfTI datatype codes of floating-point voxels: float32, float64, complex64, complex128.
_FLOAT_CODES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}


def _nifti_layout(head: bytes) -> _Layout | None:
    """Voxel offset, byte count and float dtype of a NIfTI-1/2 file from its first bytes, or None.

    Raises ValueError when the NIfTI-1 ``vox_offset`` (a float) is not a finite non-negative number.
    """
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            code, bitpix = struct.unpack(endian + "2h", head[70:74])
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            if not math.isfinite(vox_offset) or vox_offset < 0:
                raise ValueError(f"header vox_offset = {vox_offset} is not a finite non-negative number")
            offset = int(vox_offset)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            code, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : ndim + 1]):
        return None
    n = int(np.prod([int(d) for d in dims[1 : ndim + 1]], dtype=np.int64))
    dtype = np.dtype(endian + _FLOAT_CODES[code]) if code in _FLOAT_CODES else None
    return _Layout(max(offset, 348), n * bitpix // 8, dtype)


#: Header fields whose values ITK silently replaces or ignores when they are not finite (or, for the voxel size, not
#: positive): (name, NIfTI-1 offset, NIfTI-2 offset, count). ``pixdim`` starts at its element 1 (x).
_NIFTI1_FIELDS = (("pixdim", 80, "f", 3), ("scl_slope", 112, "f", 1), ("scl_inter", 116, "f", 1))
_NIFTI2_FIELDS = (("pixdim", 112, "d", 3), ("scl_slope", 176, "d", 1), ("scl_inter", 184, "d", 1))
#: Orientation fields, checked when their code (qform_code / sform_code) is set: (code offset, code format,
#: field name, field offset, count), for NIfTI-1 and NIfTI-2.
_NIFTI1_XFORMS = ((252, "h", "quatern/qoffset", 256, 6), (254, "h", "srow", 280, 12))
_NIFTI2_XFORMS = ((344, "i", "quatern/qoffset", 352, 6), (348, "i", "srow", 400, 12))


def _header_defect(head: bytes) -> str | None:
    """The first implausible geometry/scaling field of a NIfTI-1/2 header, or None.

    ITK's NIfTI reader (SimpleITK 2.5) replaces a zero or NaN voxel size with 1 mm and ignores a non-finite
    ``scl_slope``, without an error: the image would be read with a wrong geometry or wrong intensities. Checked:
    ``pixdim[1..k]`` (k = number of spatial axes, at most 3) finite and != 0, ``scl_slope``/``scl_inter`` finite,
    and the quaternion/offset (``qform_code`` > 0) and ``srow`` (``sform_code`` > 0) fields finite.
    """
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            ndim = struct.unpack(endian + "h", head[40:42])[0]
            fields, xforms = _NIFTI1_FIELDS, _NIFTI1_XFORMS
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            ndim = struct.unpack(endian + "q", head[16:24])[0]
            fields, xforms = _NIFTI2_FIELDS, _NIFTI2_XFORMS
            break
    else:
        return None
    for name, offset, fmt, count in fields:
        n = max(1, min(count, ndim)) if name == "pixdim" else count
        values = struct.unpack_from(f"{endian}{n}{fmt}", head, offset)
        if name == "pixdim" and any(v == 0 for v in values):
            return f"header voxel size (pixdim) is zero: {', '.join(f'{v:g}' for v in values)}"
        if not all(np.isfinite(values)):
            return f"header {name} is not finite: {', '.join(f'{v:g}' for v in values)}"
    for code_off, code_fmt, name, offset, count in xforms:
        if struct.unpack_from(endian + code_fmt, head, code_off)[0] > 0:
            fmt = "f" if code_fmt == "h" else "d"
            if not all(np.isfinite(struct.unpack_from(f"{endian}{count}{fmt}", head, offset))):
                return f"header {name} orientation fields are not finite"
    return None


def _read_head(path: Path) -> bytes:
    """The first 540 bytes of a (possibly gzip-compressed) file."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
            return fh.read(540)
    except EOFError:
        raise ImageDefect(path, "truncated gzip stream (file cut short)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise ImageDefect(path, f"corrupt gzip data: {exc}") from None


#: Largest voxel size (mm) along any axis: MRI slices are a few mm thick; a spacing of metres is a broken header, and
#: resampling it to 1 mm would allocate without bound.
MAX_SPACING_MM = 20.0


def _check_geometry(path: Path, spacing: tuple[float, ...], origin: tuple[float, ...],
                    direction: tuple[float, ...]) -> None:
    """Spacing finite, > 0 and <= :data:`MAX_SPACING_MM`, origin finite, direction finite and non-singular (as ITK
    reports them; the spatial axes only, at most 3)."""
    n = len(spacing)
    k = min(3, n)
    if not all(np.isfinite(spacing[:k])) or min(spacing[:k]) <= 0:
        raise ImageDefect(path, f"invalid voxel spacing {tuple(float(s) for s in spacing[:k])}")
    if max(spacing[:k]) > MAX_SPACING_MM:
        raise ImageDefect(path, f"voxel spacing {tuple(float(s) for s in spacing[:k])} mm: larger than "
                          f"{MAX_SPACING_MM:g} mm along an axis (a broken header?)")
    if not all(np.isfinite(origin[:k])):
        raise ImageDefect(path, "origin is not finite")
    d = np.asarray(direction, dtype=float).reshape(n, n)[:k, :k] if len(direction) == n * n else None
    if d is None or not np.isfinite(d).all() or abs(np.linalg.det(d)) < 1e-6:
        raise ImageDefect(path, "direction cosines are not finite or singular")


def _count_nonfinite(buf: bytes, dtype: np.dtype) -> int:
    values = np.frombuffer(buf, dtype=dtype)
    return values.size - int(np.count_nonzero(np.isfinite(values)))


def _check_bytes(path: Path, size_on_disk: int, *, full: bool) -> None:
    """Check that the file holds every byte its header announces and, when ``full``, that no voxel is NaN/inf.

    Without ``full`` only an uncompressed file's length is checked (a gzip stream cannot be measured without
    decompressing it). With ``full`` the (decompressed) bytes are streamed in 1 MiB chunks: gzip CRC, length and
    end-of-stream are verified and floating-point voxels are counted for NaN/inf on the raw bytes, because ITK's
    NIfTI reader silently turns NaN/inf into 0.
    """
    gz = path.name.endswith(".gz")
    if gz and not full:
        return
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(540)
            try:
                layout = _nifti_layout(head)
            except ValueError as exc:
                raise ImageDefect(path, str(exc)) from None
            if not full:
                total = size_on_disk
            else:
                total, bad, pos, carry = 0, 0, 0, b""
                chunk = head
                while chunk:
                    if layout is not None and layout.float_dtype is not None:
                        lo = max(layout.offset, pos)
                        hi = min(layout.offset + layout.nbytes, pos + len(chunk))
                        if hi > lo:
                            carry += chunk[lo - pos : hi - pos]
                            usable = len(carry) - len(carry) % layout.float_dtype.itemsize
                            bad += _count_nonfinite(carry[:usable], layout.float_dtype)
                            carry = carry[usable:]
                    pos += len(chunk)
                    chunk = fh.read(_CHUNK)
                total = pos
    except EOFError:
        raise ImageDefect(path, "truncated gzip stream (file cut short)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise ImageDefect(path, f"corrupt gzip data: {exc}") from None
    if layout is not None and total < layout.offset + layout.nbytes:
        raise ImageDefect(
            path, f"truncated: {total} bytes of header and voxel data, header needs {layout.offset + layout.nbytes}"
        )
    if full and bad:
        raise ImageDefect(path, f"{bad} NaN/inf voxel(s)")


def _check_dimension(path: Path, size: tuple[int, ...], components: int) -> None:
    if components != 1:
        raise ImageDefect(path, f"{components}-component (vector/RGB) pixels: one scalar per voxel expected")
    shape = "x".join(map(str, size))
    if len(size) == 4 and size[3] == 1:
        return  # squeezed by the caller
    if len(size) != 3:
        raise ImageDefect(path, f"{len(size)}D image of size {shape}: one 3D volume expected")
    if min(size) < 2:
        raise ImageDefect(path, f"degenerate 3D image of size {shape}: a volume needs >= 2 voxels per axis")


def read_image_info_checked(path: str | os.PathLike[str]) -> ImageInfo:
    """Read and check only the header of a NIfTI image (fast; voxels not read).

    Checks: the file exists and is a regular non-empty file (symlink loops and dangling links are defects), SimpleITK
    can read its header, it is one scalar 3D volume (a 4D image whose last axis has length 1 counts as 3D), its header
    holds a plausible geometry and scaling (voxel size finite and non-zero, ``scl_slope``/``scl_inter`` and the set
    orientation fields finite: ITK would silently replace or ignore them), and an uncompressed ``.nii`` is as long as
    its header says. A truncated ``.nii.gz`` is NOT detected here.

    Parameters
    ----------
    path:
        The ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    ImageInfo
        Its 3D geometry.

    Raises
    ------
    ImageDefect
        With a one-line reason.
    """
    p = Path(path)
    st = _check_file(p)
    try:
        head = _read_head(p)
    except ImageDefect:
        head = b""  # not gzip or not readable: SimpleITK's reader says why below
    if (defect := _header_defect(head)) is not None:  # before ITK, which would warn and patch the values
        raise ImageDefect(p, defect)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if p.name.endswith(".gz") and head:  # the header decompressed, ITK then found "no ImageIO reader": corrupt
            _check_bytes(p, st.st_size, full=True)  # gzip data further on, which the stream check names
        raise ImageDefect(p, f"unreadable header: {compact_sitk_error(exc, p)}") from None
    size = tuple(reader.GetSize())
    _check_dimension(p, size, reader.GetNumberOfComponents())
    _check_geometry(p, tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    _check_bytes(p, st.st_size, full=False)
    direction = tuple(reader.GetDirection())
    if len(size) == 4:  # singleton 4th axis: keep the 3D part of the geometry
        direction = direction[0:3] + direction[4:7] + direction[8:11]
    return ImageInfo(
        size[:3],
        tuple(reader.GetSpacing())[:3],
        tuple(reader.GetOrigin())[:3],
        direction,
        sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )


def iter_slabs(image: sitk.Image) -> Iterator[np.ndarray]:
    """Yield read-only numpy views of ``image`` in slabs along z (no copy of the volume)."""
    view = sitk.GetArrayViewFromImage(image)
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(view.shape[1:]))))
    for z in range(0, view.shape[0], step):
        yield view[z : z + step]


def read_image_checked(path: str | os.PathLike[str], *, allow_constant: bool = False) -> sitk.Image:
    """Read a NIfTI image with SimpleITK after checking it completely; the volume is loaded once.

    Checks everything :func:`read_image_info_checked` checks, then that the file holds all its bytes (a gzip stream
    is decompressed chunk by chunk: CRC, length and end-of-stream verified), that every voxel is finite (no NaN or
    inf) and, unless ``allow_constant``, that the volume is not constant (an all-zero volume is a defect).

    Parameters
    ----------
    path:
        The ``.nii`` or ``.nii.gz`` file.
    allow_constant:
        Accept a constant volume (for masks, which may be empty).

    Returns
    -------
    SimpleITK.Image
        A scalar 3D image (a 4D image with a singleton last axis is squeezed to 3D).

    Raises
    ------
    ImageDefect
        With a one-line reason naming the defect.
    """
    p = Path(path)
    read_image_info_checked(p)
    _check_bytes(p, os.stat(p).st_size, full=True)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ImageDefect(p, f"unreadable: {compact_sitk_error(exc, p)}") from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    _check_dimension(p, tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel())
    lo, hi, bad = np.inf, -np.inf, 0
    for slab in iter_slabs(image):
        if slab.dtype.kind == "f":
            finite = np.isfinite(slab)
            n_bad = slab.size - int(np.count_nonzero(finite))
            if n_bad:
                bad += n_bad
                continue
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if bad:
        raise ImageDefect(p, f"{bad} NaN/inf voxel(s)")
    if not allow_constant and lo == hi:
        raise ImageDefect(p, "all-zero volume" if lo == 0 else f"constant volume (every voxel = {lo:g})")
    return image


def check_binary_mask(path: str | os.PathLike[str], image: sitk.Image) -> int:
    """Check that ``image`` holds only 0 and 1; return the number of voxels equal to 1.

    Raises
    ------
    ImageDefect
        When another value occurs (the message quotes one).
    """
    ones = 0
    for slab in iter_slabs(image):
        is_one = slab == 1
        other = ~(is_one | (slab == 0))
        if other.any():
            raise ImageDefect(path, f"not a binary mask: holds value {float(slab[other][0]):g} (only 0 and 1 allowed)")
        ones += int(np.count_nonzero(is_one))
    return ones


def check_label_map(path: str | os.PathLike[str], image: sitk.Image) -> None:
    """Check that a segmentation holds non-negative integer labels.

    Raises
    ------
    ImageDefect
        When a negative or fractional value occurs.
    """
    for slab in iter_slabs(image):
        bad = (slab < 0) | (slab != np.round(slab)) if slab.dtype.kind == "f" else slab < 0
        if bad.any():
            raise ImageDefect(path, f"not a label map: holds value {float(slab[bad][0]):g}")


def grid_difference(a: ImageInfo, b: ImageInfo) -> str | None:
    """Describe how two voxel grids differ (size, spacing, origin, direction), or None when they agree.

    Tolerances: spacing relative ``SPACING_RTOL``; origin ``ORIGIN_TOL_VOXELS`` of the smallest voxel size;
    direction cosines ``DIRECTION_ATOL``.
    """
    def fmt(v: tuple[float, ...]) -> str:
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

    if a.size != b.size:
        return f"size {'x'.join(map(str, a.size))} vs {'x'.join(map(str, b.size))}"
    if not np.allclose(a.spacing, b.spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing {fmt(a.spacing)} vs {fmt(b.spacing)} mm"
    tol = ORIGIN_TOL_VOXELS * min(min(a.spacing), min(b.spacing))
    if not np.allclose(a.origin, b.origin, rtol=0, atol=tol):
        return f"origin {fmt(a.origin)} vs {fmt(b.origin)} mm"
    if not np.allclose(a.direction, b.direction, rtol=0, atol=DIRECTION_ATOL):
        return f"direction {fmt(a.direction)} vs {fmt(b.direction)}"
    return None
