"""Pre-encoded latents (and frozen image features) on disk, so long runs skip frozen encoders.

`build_latent_cache(dataset, path, codec, ...)` runs every item of a data set through a
frozen latent codec (`mupad_core.models.vae`) and, optionally, a frozen image encoder
(any callable images -> features: a teacher for the alignment loss, or the condition
image encoder), and writes a zarr (v3) group:

    latents/<name>   (N, C, h, w)  float16 or float32, one array per latent name
    features         (N, ...)      the feature encoder's output, when one is given
    features_pooled  (N, D)        its global embedding, where it gives one (a teacher's CLS)
    present/<name>   (N,) bool     False where the item had no such image (zeros stored)
    strings/<key>    (N,) str      the items' text fields (caption, rna_id, split, ...)
    scalars/<key>    (N, ...)      the items' numeric fields (row, slide, xy, ...)
    done             (chunks,) bool which chunks are written

Its attributes record the codec's identity (class, configuration and a digest of its
weights), the feature encoder's, the data set's fingerprint (for `ManifestDataset` a
hash of the manifest file and the crop/split settings), the item count, chunk size and
dtype. The store is written chunk by chunk into ``<path>.partial`` (the partial marker)
and renamed to `path` when complete; running the build again resumes from the chunks
marked done, and a store built for a different codec, encoder, data set or layout is
refused with a `LatentCacheError` that says what differs (``overwrite=True`` rebuilds).

`LatentCacheDataset(path)` reads it back as items: ``"<name>"`` latents (C, h, w) and
``"features"`` as float32 tensors (None where absent, with ``"has_<name>"`` flags) plus
the stored text and numbers, ready for `datasets.collate_items`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Subset

from ..models.identity import codec_identity, encoder_identity


CACHE_FORMAT = "mupad-latent-cache"
CACHE_VERSION = 1


class LatentCacheError(RuntimeError):
    """A latent cache that does not match what it is asked for, or is damaged."""


# ---------------------------------------------------------------------------- identities


def dataset_identity(dataset: Any) -> str:
    """The data set's `fingerprint()` (ManifestDataset, SlidePatchDataset), else an error."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return f"{type(dataset).__name__}:{fingerprint()}"
    raise LatentCacheError(
        f"{type(dataset).__name__} has no fingerprint(); pass dataset_id='...' naming its contents "
        "(it guards against reusing a cache built from other data)"
    )


# ---------------------------------------------------------------------------- build


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _features_of(output: Any) -> dict[str, torch.Tensor]:
    """{"features": (B, ...)} plus {"pooled": (B, D)} where the encoder gives a global embedding."""
    if isinstance(output, torch.Tensor):
        return {"features": output}
    for key in ("features", "tokens"):  # a teacher's TeacherOutput, an EncodedCondition
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            pooled = getattr(output, "pooled", None)
            return {"features": value, **({"pooled": pooled} if isinstance(pooled, torch.Tensor) else {})}
    raise LatentCacheError(f"the feature encoder returned {type(output).__name__}; expected a tensor (B, ...)")


def _describe_mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    keys = [k for k in wanted if found.get(k) != wanted[k]]
    return "; ".join(f"{k}: cache has {found.get(k)!r}, asked for {wanted[k]!r}" for k in keys)


def _normalise_latents(latents: Mapping[str, str | Sequence[str]] | Sequence[str] | str) -> dict[str, list[str]]:
    if isinstance(latents, str):
        latents = {latents: [latents]}
    elif not isinstance(latents, Mapping):
        latents = {k: [k] for k in latents}
    spec = {str(name): [keys] if isinstance(keys, str) else list(keys) for name, keys in latents.items()}
    bad = [n for n in spec if n in ("features", "features_pooled", "done") or "/" in n or not n]
    if bad or not spec or any(not keys for keys in spec.values()):
        raise ValueError(
            f"latents must name images to encode, e.g. {{'latent': ('target', 'source')}}; got {latents!r}"
        )
    return spec


def _first_present(item: Mapping[str, Any], keys: Sequence[str]) -> torch.Tensor | None:
    for key in keys:
        value = item.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


class _CacheWriter:
    """The open partial store: creates arrays on first use, writes one chunk at a time."""

    def __init__(self, group: zarr.Group, n: int, chunk_size: int, dtype: str):
        self.group = group
        self.n = n
        self.chunk_size = chunk_size
        self.dtype = dtype

    def array(self, name: str, sample_shape: tuple[int, ...], dtype: Any, fill: Any = 0, per_item: bool = False):
        """The array `name`, created on first use: one shard (file) per cache chunk, and
        with `per_item` one inner chunk per item, so random reads decode a single item."""
        if name in self.group:
            array = self.group[name]
            if tuple(array.shape[1:]) != tuple(sample_shape):
                raise LatentCacheError(
                    f"{name}: items now give shape {sample_shape}, the cache holds {tuple(array.shape[1:])}; "
                    "every item must have the same size (crop them)"
                )
            return array
        shape, block = (self.n, *sample_shape), (self.chunk_size, *sample_shape)
        if per_item:
            return self.group.create_array(
                name, shape=shape, shards=block, chunks=(1, *sample_shape), dtype=dtype, fill_value=fill
            )
        return self.group.create_array(name, shape=shape, chunks=block, dtype=dtype, fill_value=fill)


def build_latent_cache(
    dataset: Dataset,
    path: str | os.PathLike,
    codec: Any,
    *,
    latents: Mapping[str, str | Sequence[str]] | Sequence[str] | str = {"latent": ("target", "source")},  # noqa: B006
    feature_encoder: Callable[[torch.Tensor], Any] | None = None,
    feature_from: str | Sequence[str] = "source",
    vae_id: str | None = None,
    feature_id: str | None = None,
    dataset_id: str | None = None,
    chunk_size: int = 64,
    batch_size: int = 16,
    dtype: str = "float16",
    device: str | torch.device | None = None,
    num_workers: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Encode `dataset` into a latent cache at `path` (resuming a partial one); returns `path`.

    `latents` maps a stored name to the item key(s) to encode, the first present one
    winning: the default ``{"latent": ("target", "source")}`` encodes the target, or the
    source where a row has none (an unpaired/text-only row, whose source is the image
    itself). Add e.g. ``"source_latent": "source"`` for a spatial template.
    `feature_encoder(images)` gets the ``feature_from`` images as (B, C, H, W) in [0, 1]
    and returns (B, ...) features (or an `EncodedCondition`, whose tokens are kept).
    Random crops and augmentations are frozen into the cache as item i of epoch 0 draws
    them. `progress(done_chunks, total_chunks)` is called after each chunk."""
    path = Path(path).expanduser()
    partial = _partial_path(path)
    if chunk_size <= 0 or batch_size <= 0:
        raise ValueError(f"chunk_size and batch_size must be positive, got {chunk_size}, {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    spec = _normalise_latents(latents)
    feature_keys = [feature_from] if isinstance(feature_from, str) else list(feature_from)
    n = len(dataset)
    if n == 0:
        raise LatentCacheError("the data set is empty")
    wanted = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "vae": vae_id or codec_identity(codec),
        "feature_encoder": (feature_id or encoder_identity(feature_encoder)) if feature_encoder is not None else None,
        "dataset": dataset_id or dataset_identity(dataset),
        "n": n,
        "chunk_size": int(chunk_size),
        "dtype": dtype,
        "latents": spec,
        "feature_from": feature_keys if feature_encoder is not None else None,
    }

    for existing in (path, partial):
        if not existing.exists():
            continue
        if overwrite:
            shutil.rmtree(existing)
            continue
        found = _read_attrs(existing)
        mismatch = _describe_mismatch(found, wanted)
        if mismatch:
            raise LatentCacheError(
                f"{existing}: a latent cache built for something else ({mismatch}); use another path or overwrite=True"
            )
        if existing == path:
            return path  # complete and matching: nothing to do

    chunks = -(-n // chunk_size)
    if partial.exists():
        group = zarr.open_group(partial, mode="r+")
    else:
        group = zarr.open_group(partial, mode="w-")
        group.attrs.update({**wanted, "complete": False, "dataset_repr": repr(dataset)[:500]})
        group.create_array("done", shape=(chunks,), chunks=(1,), dtype=bool, fill_value=False)
    writer = _CacheWriter(group, n, chunk_size, dtype)
    done = np.asarray(group["done"][:], dtype=bool)
    if progress is not None:
        progress(int(done.sum()), chunks)
    # Frozen encoders run in eval mode (no dropout, fixed norm statistics); restored after.
    modules = [m for m in (feature_encoder, getattr(codec, "vae", None), codec) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        for chunk in range(chunks):
            if done[chunk]:
                continue
            start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, n)
            _write_chunk(
                writer, dataset, start, stop, codec, spec, feature_encoder, feature_keys, batch_size, device,
                num_workers, seed + chunk,
            )
            group["done"][chunk] = True
            done[chunk] = True
            if progress is not None:
                progress(int(done.sum()), chunks)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    group.attrs["complete"] = True
    os.replace(partial, path)
    return path


def _write_chunk(writer, dataset, start, stop, codec, spec, feature_encoder, feature_keys, batch_size, device,
                 num_workers, chunk_seed) -> None:
    """Encode items [start, stop) and write them; the arrays' chunks hold exactly this range."""
    count = stop - start
    loader = DataLoader(
        Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    buffers: dict[str, Any] = {}
    presence: dict[str, np.ndarray] = {}
    fields: dict[str, list[Any]] = {}
    generator = torch.Generator().manual_seed(chunk_seed)
    offset = 0
    for items in loader:
        size = len(items)
        for name, keys in spec.items():
            _encode_into(buffers, presence, name, [_first_present(it, keys) for it in items], offset, count,
                         lambda x: codec.encode(x, generator=generator), device, start)
        if feature_encoder is not None:
            _encode_into(buffers, presence, "features", [_first_present(it, feature_keys) for it in items], offset,
                         count, feature_encoder, device, start)
        for item in items:
            for key, value in item.items():
                if isinstance(value, (torch.Tensor, type(None))):
                    continue
                fields.setdefault(key, []).append(value)
        offset += size
    dtype = np.float16 if writer.dtype == "float16" else np.float32
    for name, values in buffers.items():
        array_name = name if name in ("features", "features_pooled") else f"latents/{name}"
        writer.array(array_name, values.shape[1:], writer.dtype, per_item=True)[start:stop] = values.astype(dtype)
        writer.array(f"present/{name}", (), bool, False)[start:stop] = presence[name]
    for key, values in fields.items():
        if len(values) != count:
            continue  # a field only some items have: not stored
        if all(isinstance(v, str) for v in values):
            writer.array(f"strings/{key}", (), str, "")[start:stop] = np.array(values, dtype=object)
        else:
            try:
                numeric = np.asarray(values)
            except ValueError:
                continue
            if numeric.dtype.kind in "biuf":
                kind = bool if numeric.dtype.kind == "b" else (np.int64 if numeric.dtype.kind in "iu" else np.float64)
                writer.array(f"scalars/{key}", numeric.shape[1:], kind)[start:stop] = numeric.astype(kind)


def _encode_into(buffers, presence, name, images, offset, count, encode, device, start) -> None:
    rows = [i for i, image in enumerate(images) if image is not None]
    if name not in presence:
        presence[name] = np.zeros(count, dtype=bool)
    if not rows:
        return
    shapes = {tuple(images[i].shape) for i in rows}
    if len(shapes) > 1:
        raise LatentCacheError(
            f"items {start + offset}..{start + offset + len(images) - 1} have images of shapes {sorted(shapes)} for "
            f"'{name}'; crop them to one size"
        )
    batch = torch.stack([images[i] for i in rows])
    if device is not None:
        batch = batch.to(device)
    with torch.no_grad():
        outputs = _features_of(encode(batch)) if name == "features" else {name: encode(batch)}
    for key, out in outputs.items():
        key = "features_pooled" if key == "pooled" else key
        out = out.detach().float().cpu().numpy()
        if key not in buffers:
            buffers[key] = np.zeros((count, *out.shape[1:]), dtype=np.float32)
            presence.setdefault(key, np.zeros(count, dtype=bool))
        elif buffers[key].shape[1:] != out.shape[1:]:
            raise LatentCacheError(
                f"'{key}' came out as {out.shape[1:]} after {buffers[key].shape[1:]}; crop to one size"
            )
        for j, i in enumerate(rows):
            buffers[key][offset + i] = out[j]
            presence[key][offset + i] = True


def _read_attrs(path: Path) -> dict[str, Any]:
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises several types for a folder that is not a group
        raise LatentCacheError(f"{path}: not a latent cache (cannot open it as zarr: {error})") from error
    attrs = dict(group.attrs)
    if attrs.get("format") != CACHE_FORMAT:
        raise LatentCacheError(f"{path}: not a latent cache (format {attrs.get('format')!r})")
    return attrs


# ---------------------------------------------------------------------------- read


class LatentCacheDataset(Dataset):
    """Items of a complete latent cache.

    `expect_vae` / `expect_dataset` / `expect_feature_encoder`: a codec, data set or
    encoder (or their identity strings) the cache must have been built with; a mismatch
    raises `LatentCacheError`. Latents and features come back as float32 tensors; names
    not present for an item are None with ``has_<name>`` False."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        expect_vae: Any = None,
        expect_dataset: Any = None,
        expect_feature_encoder: Any = None,
    ):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            partial = _partial_path(self.path)
            hint = ""
            if partial.exists():
                hint = f" (a partial build is at {partial}; run build_latent_cache again to finish it)"
            raise LatentCacheError(f"{self.path}: no latent cache here{hint}")
        self.attrs = _read_attrs(self.path)
        if not self.attrs.get("complete"):
            raise LatentCacheError(f"{self.path}: the cache is incomplete; run build_latent_cache again to finish it")
        checks = {}
        if expect_vae is not None:
            checks["vae"] = expect_vae if isinstance(expect_vae, str) else codec_identity(expect_vae)
        if expect_dataset is not None:
            checks["dataset"] = expect_dataset if isinstance(expect_dataset, str) else dataset_identity(expect_dataset)
        if expect_feature_encoder is not None:
            checks["feature_encoder"] = (
                expect_feature_encoder if isinstance(expect_feature_encoder, str)
                else encoder_identity(expect_feature_encoder)
            )
        mismatch = _describe_mismatch(self.attrs, checks)
        if mismatch:
            raise LatentCacheError(f"{self.path}: built for something else ({mismatch})")
        self.latent_names = list(self.attrs["latents"])
        self.has_features = self.attrs.get("feature_encoder") is not None
        self.n = int(self.attrs["n"])
        self._group: zarr.Group | None = None
        self._small: dict[str, np.ndarray] | None = None

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r")
        return self._group

    def _small_arrays(self) -> dict[str, np.ndarray]:
        """Presence flags, text and numbers, read whole once per process (they are small)."""
        if self._small is None:
            small = {}
            for prefix in ("present", "strings", "scalars"):
                for key in self._members(prefix):
                    small[f"{prefix}/{key}"] = np.asarray(self.group[f"{prefix}/{key}"][:])
            self._small = small
        return self._small

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None, "_small": None}

    def __len__(self) -> int:
        return self.n

    def _members(self, prefix: str) -> list[str]:
        return sorted(name for name, _ in self.group[prefix].members()) if prefix in self.group else []

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} cached items")
        group = self.group
        small = self._small_arrays()
        item: dict[str, Any] = {}
        names = [(name, f"latents/{name}") for name in self.latent_names]
        if self.has_features:
            names.append(("features", "features"))
            if "features_pooled" in group:
                names.append(("features_pooled", "features_pooled"))
        for name, array_name in names:
            flags = small.get(f"present/{name}")
            present = flags is not None and bool(flags[index]) and array_name in group
            item[name] = torch.from_numpy(np.asarray(group[array_name][index], dtype=np.float32)) if present else None
            item[f"has_{name}"] = present
        for key, values in small.items():
            prefix, _, name = key.partition("/")
            if prefix == "strings":
                item[name] = str(values[index])
            elif prefix == "scalars":
                value = values[index]
                item[name] = value.item() if value.ndim == 0 else tuple(value.tolist())
        item["index"] = index
        return item

    def __repr__(self) -> str:
        return (
            f"LatentCacheDataset({str(self.path)!r}, n={self.n}, latents={self.latent_names}, "
            f"vae={self.attrs['vae']!r})"
        )
