"""Corpus files: reading and validating the documents (and task rows) er_ray is given.

Parquet, CSV/TSV or JSONL; every error names the file, the row (1 = first data row) and the field. A corpus is
files with an id column and a text column (a column of word lists makes a token-classification corpus).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ErRayError

CORPUS_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".ndjson")


class DataError(ErRayError, ValueError):
    """A data file is unusable; the message names the file, the row (1 = first data row) and the field."""


def read_table(path: str | Path) -> pa.Table:
    """Parquet, CSV or JSONL into an Arrow table; errors name the file."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".brotli") else path.suffix
    try:
        if suffix.startswith(".parquet") or suffix == ".pq":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
            # Read every column as a string column first: a text column of digits must not become int64.
            return pcsv.read_csv(path, parse_options=opts,
                                 convert_options=pcsv.ConvertOptions(column_types=_all_strings(path, opts)))
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _read_jsonl(path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    raise DataError(f"cannot read {path}: unknown file type {path.suffix!r} (use .parquet, .csv, .tsv or .jsonl)")


def _all_strings(path: Path, opts) -> dict[str, pa.DataType]:
    import pyarrow.csv as pcsv

    with pcsv.open_csv(path, parse_options=opts) as reader:
        return {name: pa.string() for name in reader.schema.names}


def _read_jsonl(path: Path) -> pa.Table:
    # Line by line with the json module: a malformed line is reported by its row number.
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, row {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, row {i}: expected a JSON object per line")
            rows.append(row)
            lines.append(i)
    if not rows:
        raise DataError(f"{path}: no rows")
    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for n in names:
        vals = [r.get(n) for r in rows]
        kinds = [_kind(v) for v in vals if v is not None]
        common = max(dict.fromkeys(kinds), key=kinds.count) if kinds else "string"  # ties: the first
        for i, v in enumerate(vals):  # Arrow columns have one type: report the odd row out, by number
            if v is not None and _kind(v) != common:
                raise DataError(f"{path}, row {lines[i]}, field {n!r}: a {_kind(v)} ({v!r:.40}) where the other "
                                f"rows have a {common}")
        columns[n] = pa.array(vals, pa.list_(pa.string()) if common == "list" else None)
    return pa.table(columns)


def _kind(v) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}.get(type(v), "object")



@dataclass
class Corpus:
    """Documents to cache: files (Parquet, CSV, JSONL) with an id column and a text (or tokens) column."""

    files: list[str]
    id_column: str = "id"
    text_column: str = "text"
    token_classification: bool = False
    """the text column holds lists of words (tokens); word_ids are stored to map tokens back to words"""
    context_column: str | None = None
    """question answering: the text column holds questions and this one their contexts; a document is the pair"""

    @property
    def columns(self) -> list[str]:
        """What a document is read as: id, text (and context)."""
        return [self.id_column, self.text_column] + ([self.context_column] if self.context_column else [])

    def text(self, table: pa.Table) -> list:
        """Each document's text: a string, a list of words, or a (question, context) pair."""
        texts = table.column(self.text_column).to_pylist()
        if self.context_column:
            return list(zip(texts, table.column(self.context_column).to_pylist()))
        return texts


def corpus_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))
                       and f.suffix in CORPUS_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .parquet, .csv or .jsonl files in this directory")
        return files
    if not p.exists():
        raise DataError(f"corpus {path}: no such file, directory or built-in task")
    return [str(p)]


def resolve_corpus(items: list[str], id_column: str = "id", text_column: str = "text",
                   context_column: str | None = None) -> Corpus:
    """Corpus files / directories of them (a built-in task or a task spec: `tasks.Task.corpus()`)."""
    files = [f for item in items for f in corpus_files(item)]
    return Corpus(files, id_column, text_column, _holds_word_lists(files[0], text_column), context_column)


def _holds_word_lists(file: str, column: str) -> bool:
    """A corpus whose text column holds lists of words is a token classification corpus (word_ids are kept)."""
    try:
        schema = pq.read_schema(file) if file.endswith(".parquet") else read_table(file).schema
    except Exception:
        return False  # read_ids reports unreadable files with their name
    return column in schema.names and pa.types.is_list(schema.field(column).type)


def read_ids(corpus: Corpus) -> list[tuple[str, list[str]]]:
    """(file, ids) per file; errors on a missing id column, empty ids and duplicate ids, naming file and row."""
    out, seen = [], {}
    for f in corpus.files:
        try:
            if f.endswith(".parquet"):
                schema = pq.read_schema(f)
                for c in corpus.columns:
                    if c not in schema.names:
                        raise DataError(f"{f}: no column {c!r} (columns: {schema.names})")
                t = pq.read_table(f, columns=[corpus.id_column])
            else:
                t = read_table(f)
                for c in corpus.columns:
                    if c not in t.column_names:
                        raise DataError(f"{f}: no column {c!r} (columns: {t.column_names})")
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {f}: {e}") from None
        ids = t.column(corpus.id_column).to_pylist()
        for row, i in enumerate(ids, 1):
            if i is None or str(i) == "":
                raise DataError(f"{f}, row {row}, field {corpus.id_column!r}: empty id")
            key = str(i)
            if key in seen:
                raise DataError(f"{f}, row {row}, field {corpus.id_column!r}: duplicate id {key!r} "
                                f"(first at {seen[key][0]}, row {seen[key][1]})")
            seen[key] = (f, row)
        out.append((f, [str(i) for i in ids]))
    return out


def doc_hashes(corpus: Corpus) -> dict[str, str]:
    """id -> `doc_sha256` of every document of a corpus (to compare with what a cache was built from)."""
    out = {}
    for f in corpus.files:
        cols = corpus.columns
        t = pq.read_table(f, columns=cols) if f.endswith(".parquet") else read_table(f).select(cols)
        for i, text in zip(t.column(corpus.id_column).to_pylist(), corpus.text(t)):
            if bad_text(text, corpus.token_classification) is None:
                out[str(i)] = doc_sha256(str(i), text)
    return out


def read_rows(file: str, rows: list[int], columns: list[str]) -> pa.Table:
    """Some rows of a corpus file (by position), without reading the rest of a Parquet file."""
    if file.endswith(".parquet"):
        import pyarrow.dataset as pds

        return pds.dataset(file, format="parquet").take(pa.array(rows, pa.int64()), columns=columns)
    return read_table(file).select(columns).take(pa.array(rows, pa.int64()))


def bad_text(text, token_classification: bool) -> str | None:
    """What is wrong with a document's text (None if nothing)."""
    if text is None:
        return "missing text (None)"
    if isinstance(text, tuple):  # question answering: (question, context)
        return next((f"{what}: {bad}" for what, part in zip(("question", "context"), text)
                     if (bad := bad_text(part, False))), None)
    if token_classification:
        if isinstance(text, str):
            return "tokens must be a list of words, got a string"
        if not text or not all(isinstance(w, str) and w for w in text):
            return "tokens must be a non-empty list of non-empty strings"
        return None
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if not text.strip():
        return "empty text"
    return None


def doc_sha256(doc_id: str, text) -> str:
    """A document's hash (id and text; words, or question and context, joined by a unit separator): the cache keeps
    it per document, so a changed text is noticed."""
    body = text if isinstance(text, str) else "\x1f".join(text)
    return hashlib.sha256(f"{doc_id}\0{body}".encode()).hexdigest()

