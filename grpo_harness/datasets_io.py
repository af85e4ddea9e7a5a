"""Rows for ``train vlm --data`` / ``--eval-data``: the formats a TRL user brings.

Sources (chosen by the path):

- a folder written by ``datasets``' ``Dataset.save_to_disk`` (a saved ``DatasetDict``: its
  ``train`` split for ``--data``, ``test`` or else ``validation`` for ``--eval-data``; without
  it the folder is refused, naming its splits: point the option at a split's own folder);
- ``.parquet`` and ``.csv`` files, read with ``datasets.load_dataset`` (local files: no network;
  the Arrow cache goes where ``datasets`` puts it, ``HF_DATASETS_CACHE``);
- ``.jsonl`` (one object a line) and ``.json`` (JSON lines, or one list of objects), read here
  with the standard library, so that JSON needs no extra package and errors name the line.

The ``datasets`` formats need the ``datasets`` package (the ``data`` extra); without it they are
refused in one line.

Columns. ``image`` and ``prompt`` are required, everything else (``answer``, ``solution``...) is
passed to the reward functions. A missing ``image`` column falls back to ``images`` (TRL's
name for several images per row). ``--column TARGET=SOURCE`` renames a column (``--column
image=img --column answer=label``); a column already named TARGET is dropped for it.

Images. A value is a path (relative ones are looked up beside the data file, or inside the
saved folder, then from the working directory), raw bytes of an encoded image, a ``{"bytes":
..., "path": ...}`` dict (how ``datasets`` stores an ``Image()`` feature; the bytes win when
both are set), a PIL image, or a list of these (several images per row). Every image of every
row is decoded once when the rows are loaded, so a bad one is named by its row (``file:line``
for JSON, ``file row i`` counting from 0 otherwise) before any model is loaded.

Prompts. A string (the adapter puts one image placeholder per image before it), or a
conversational prompt in TRL's format: a list of ``{"role", "content"}`` messages whose
content is a string or a list of parts (``{"type": "image"}``, ``{"type": "text", "text":
...}``), also stored as a JSON string (as CSV files hold it: parsed; one that starts like such a
list but does not parse is refused). As TRL does, string contents become text parts, and when no message has an image
placeholder one per image is put before the first user message's text; keys left None by
Arrow's struct columns are dropped. The number of placeholders must equal the row's images.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .run import UsageError, one_line

JSON_SUFFIXES = (".jsonl", ".json")
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
"""Suffix -> ``datasets.load_dataset`` builder name."""
ROLES = ("system", "user", "assistant")
SPLITS = {"--data": ("train",), "--eval-data": ("test", "validation")}
"""The split of a saved ``DatasetDict`` each option reads, in order of preference; another split
is read only when the option points at its folder (never guessed)."""


def parse_column_maps(specs: Sequence[str]) -> dict[str, str]:
    """``["image=img", "answer=label"]`` -> ``{"image": "img", "answer": "label"}``."""
    mapping: dict[str, str] = {}
    for spec in specs or ():
        target, sep, source = str(spec).partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not target or not source:
            raise UsageError(f"--column {spec!r}: expected TARGET=SOURCE, e.g. image=img")
        if target in mapping:
            raise UsageError(f"--column {spec!r}: {target!r} is mapped twice")
        mapping[target] = source
    return mapping


class DataRows(Sequence):
    """The rows of one ``--data`` source, normalised on access (columns renamed, images as
    paths or PIL images, prompts as TRL-style messages or strings); what the adapter indexes."""

    def __init__(self, table, labels, *, mapping: dict[str, str], base: Path, option: str):
        self.table = table
        """A ``datasets.Dataset`` (images not decoded) or a list of dicts."""
        self.labels = labels
        """``labels(i)`` -> where row i is, for error messages."""
        self.mapping = mapping
        self.base = base
        self.option = option

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.row(i, check=False)

    def row(self, i: int, *, check: bool) -> dict[str, Any]:
        """Row ``i`` normalised; ``check``: also decode the images that are paths (UsageError
        naming the row when one does not)."""
        where = self.labels(i)
        row = rename_columns(dict(self.table[i]), self.mapping, where)
        images = row["image"]
        many = isinstance(images, (list, tuple))
        values = list(images) if many else [images]
        if not values:
            raise UsageError(f"{where}: the image list is empty")
        opened = [open_image(v, self.base, where, check=check) for v in values]
        row["image"] = opened if many else opened[0]
        row["prompt"] = normalise_prompt(row["prompt"], len(opened), where)
        return row

    def check(self) -> "DataRows":
        """Decode every image of every row once (and drop it); UsageError naming the row."""
        if not len(self):
            raise UsageError(f"{self.option} {self.labels(None)} holds no rows")
        for i in range(len(self)):
            self.row(i, check=True)
        return self


def rename_columns(raw: dict[str, Any], mapping: dict[str, str], where: str) -> dict[str, Any]:
    """Apply ``--column`` renames, fall back from ``images`` to ``image``, check the required
    columns; UsageError naming the row and the columns it has."""
    missing = [src for src in mapping.values() if src not in raw]
    if missing:
        raise UsageError(f"{where}: no column {missing[0]!r} to map (columns: {', '.join(raw)})")
    sources = set(mapping.values())
    row = {k: v for k, v in raw.items() if k not in sources and k not in mapping}
    row.update({target: raw[source] for target, source in mapping.items()})
    if "image" not in row and "images" in row:
        row["image"] = row.pop("images")
    for need in ("image", "prompt"):
        if need not in row:
            raise UsageError(f"{where}: no {need!r} column (columns: {', '.join(raw)}); "
                             f"name one with --column {need}=COLUMN")
    if row["image"] is None:
        raise UsageError(f"{where}: the image is missing (None)")
    return row


def open_image(value: Any, base: Path, where: str, *, check: bool):
    """One image value -> a path string (opened by the adapter) or a PIL image (from bytes).
    ``check``: decode a path's image now. UsageError naming the row."""
    from PIL import Image

    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise UsageError(f"{where}: image dict {sorted(value)} has neither 'bytes' nor 'path'")
        value = data if data is not None else path
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises several types for bad data
            raise UsageError(f"{where}: image bytes ({len(value)} bytes) do not decode: "
                             f"{type(e).__name__}: {one_line(e)}") from None
    if not isinstance(value, (str, Path)):
        raise UsageError(f"{where}: image value of type {type(value).__name__} is not a path, bytes, "
                         "a {'bytes', 'path'} dict or a PIL image")
    path = _find(Path(value).expanduser(), base)
    if path is None:
        raise UsageError(f"{where}: image file {str(value)!r} not found (looked beside the data and "
                         "in the working directory)")
    if check:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad file
            raise UsageError(f"{where}: image {path} does not decode: {type(e).__name__}: "
                             f"{one_line(e)}") from None
    return str(path)


def _find(path: Path, base: Path) -> Path | None:
    for candidate in ([path] if path.is_absolute() else [base / path, path]):
        if candidate.is_file():
            return candidate
    return None


def normalise_prompt(prompt: Any, n_images: int, where: str):
    """A string as it is; chat messages in TRL's structured form with one image placeholder
    per image (module docstring); a string that holds chat messages as JSON (how a CSV file
    stores them) is parsed. UsageError naming the row."""
    if isinstance(prompt, str):
        prompt = _json_chat(prompt, where)
        if isinstance(prompt, str):
            return prompt
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise UsageError(f"{where}: the prompt must be a string or a non-empty list of chat messages, "
                         f"got {type(prompt).__name__}")
    messages = [_message(m, where) for m in prompt]
    has_placeholder = any(p.get("type") == "image" for m in messages if isinstance(m["content"], list)
                          for p in m["content"])
    out, inserted = [], has_placeholder
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            lead = [{"type": "image"}] * n_images if m["role"] == "user" and not inserted else []
            inserted = inserted or bool(lead)
            content = [*lead, {"type": "text", "text": content}]
        out.append({**m, "content": content})
    count = sum(p.get("type") == "image" for m in out for p in m["content"])
    if count != n_images:
        raise UsageError(f"{where}: the prompt has {count} image placeholder(s) ({{'type': 'image'}}) "
                         f"for {n_images} image(s) in the row")
    return out


def _json_chat(text: str, where: str):
    """The chat messages a JSON string holds (a list of objects with a 'role'), else ``text``.
    A string that starts as such a list but does not parse is refused: fed to the model as
    text, it would be trained on silently."""
    head = text.lstrip()
    if not head.startswith("["):
        return text
    try:
        value = json.loads(head)
    except json.JSONDecodeError as e:
        if head[1:].lstrip().startswith("{"):
            raise UsageError(f"{where}: the prompt looks like a JSON chat prompt but does not parse ({e}); "
                             "store the messages as valid JSON, or the prompt as plain text") from None
        return text
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    return text


def _message(message: Any, where: str) -> dict[str, Any]:
    """One chat message checked, None-valued keys of its parts dropped."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise UsageError(f"{where}: a prompt message must be a dict with 'role' and 'content', got "
                         f"{str(message)[:80]}")
    if message["role"] not in ROLES:
        raise UsageError(f"{where}: prompt message role {message['role']!r}; expected one of {', '.join(ROLES)}")
    content = message["content"]
    if isinstance(content, str):
        return dict(message)
    if not isinstance(content, (list, tuple)):
        raise UsageError(f"{where}: a message's content must be a string or a list of parts")
    parts = []
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            raise UsageError(f"{where}: a content part must be a dict with a 'type', got {str(part)[:80]}")
        part = {k: v for k, v in part.items() if v is not None}
        if part["type"] == "image" and len(part) > 1:
            raise UsageError(f"{where}: an image inside the prompt's messages is not supported; put it "
                             "in the image column and leave {'type': 'image'} in the message")
        parts.append(part)
    return {**message, "content": parts}


# --- sources ---------------------------------------------------------------------------------------

def load_rows(path: Path, *, columns: Sequence[str] = (), option: str = "--data",
              cache_dir: str | None = None) -> DataRows:
    """The rows of ``path`` (any source of the module docstring), every image decoded once.

    ``columns``: ``--column TARGET=SOURCE`` specs; ``cache_dir``: where ``datasets`` keeps its
    Arrow cache of parquet/CSV files (None: its default). UsageError in one line."""
    path = Path(path)
    mapping = parse_column_maps(columns)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such file or folder")
    if path.is_dir():
        table = _saved_dataset(path, option)
        rows = DataRows(table, _row_labels(path.name), mapping=mapping, base=path, option=option)
    elif path.suffix.lower() in JSON_SUFFIXES:
        names, records = read_json_rows(path)
        labels = lambda i: path.name if i is None else names[i]  # noqa: E731
        rows = DataRows(records, labels, mapping=mapping, base=path.parent, option=option)
    elif path.suffix.lower() in DATASETS_SUFFIXES:
        table = _dataset_file(path, DATASETS_SUFFIXES[path.suffix.lower()], option, cache_dir)
        rows = DataRows(table, _row_labels(path.name), mapping=mapping, base=path.parent, option=option)
    else:
        raise UsageError(f"{option} {path}: unknown format {path.suffix or '(no suffix)'!r}; expected a "
                         f"folder saved with datasets' save_to_disk, or a {', '.join(_suffixes())} file")
    return rows.check()


def _suffixes() -> list[str]:
    return [*JSON_SUFFIXES, *DATASETS_SUFFIXES]


def _row_labels(name: str):
    return lambda i: name if i is None else f"{name} row {i}"


def read_json_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(labels, objects) of a JSON lines file (label ``name:line``), or of a ``.json`` file
    holding one list of objects (label ``name item i``)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path.name}: not JSON ({e})") from None
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise UsageError(f"{path.name} item {bad}: expected a JSON object")
        return [f"{path.name} item {i}" for i in range(len(records))], records
    lines, records = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path.name}:{lineno}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path.name}:{lineno}: expected a JSON object, got {type(record).__name__}")
        lines.append(f"{path.name}:{lineno}")
        records.append(record)
    return lines, records


def _import_datasets(path: Path, option: str):
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{option} {path}: reading it needs the 'datasets' package (pip install "
                         "'grpo-harness[data]'); JSON lines work without it") from None
    datasets.disable_progress_bars()
    return datasets


def _saved_dataset(path: Path, option: str):
    """A folder of ``save_to_disk``: the Dataset (a DatasetDict's ``train`` or only split)."""
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise UsageError(f"{option} {path}: a folder, but not one saved with datasets' save_to_disk "
                         "(no state.json or dataset_dict.json in it)")
    datasets = _import_datasets(path, option)
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a damaged folder
        raise UsageError(f"{option} {path}: does not load: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        wanted = SPLITS.get(option, ("train",))
        split = next((name for name in wanted if name in data), None)
        if split is None:
            raise UsageError(f"{option} {path}: a DatasetDict with the split(s) {', '.join(splits)} and no "
                             f"{' or '.join(map(repr, wanted))}; point {option} at the split's folder to use it "
                             f"({path}/{splits[0]})")
        data = data[split]
    return undecoded(data)


def _dataset_file(path: Path, builder: str, option: str, cache_dir: str | None):
    datasets = _import_datasets(path, option)
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - pyarrow / pandas parse errors
        raise UsageError(f"{option} {path}: does not load as {builder}: {type(e).__name__}: "
                         f"{one_line(e)}") from None
    return undecoded(data)


def undecoded(data):
    """``data`` with every ``Image`` feature (also inside lists) set to ``decode=False``, so that
    rows hold ``{"bytes", "path"}`` dicts and this module decodes (and names a bad row)."""
    import datasets

    list_type = getattr(datasets, "List", datasets.Sequence)  # datasets < 4: Sequence

    def plain(feature):
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, list_type):
            return list_type(plain(feature.feature), length=feature.length)
        if isinstance(feature, dict):
            return {k: plain(v) for k, v in feature.items()}
        return feature

    for name, feature in data.features.items():
        if plain(feature) != feature:
            data = data.cast_column(name, plain(feature))
    return data
