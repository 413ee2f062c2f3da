"""Labels from a table: a CSV or TSV file, or a DataFrame, of image paths and labels.

    labels.csv --read_file--> Table(paths, labels, is_val) --data.from_table--> Examples
    DataFrame  --from_columns-^   (tl_keras.finetune(df): --saved_dataframe--> a CSV file)

A table has a header row. Its path column (the first, unless
`config.table.path_column` names one) holds image paths relative to the file's
folder (absolute paths are taken as they are; a relative one may not leave
the folder); its label column (the second, unless `table.label_column`) one
label per image, or with config.task=multi_label its labels, split by
`table.label_delimiter` (auto: `|`, `;` or a space, the first a cell holds).
An optional split column (`table.split_column`, "split") says `train` or
`valid` per row; without it validation is held out by seed, as for a folder.
A single-label table with several labels in a cell is refused, naming the
settings that read it either way.

Every problem is one line before any image is read: a missing column, an empty
label cell, a label seen only in validation, a path leaving the folder.

Example:
    table = read_file("train.csv", config.table)
    examples = data.from_table(table, ...)
"""

import csv
import dataclasses
import hashlib
import io
import os
from types import SimpleNamespace

from tl_keras import run_folder

EXTENSIONS = (".csv", ".tsv")
DELIMITERS = ("|", ";", " ")  # tried in this order by label_delimiter="auto"
SPLITS = {"train": False, "valid": True, "val": True, "validation": True}  # -> is_val


@dataclasses.dataclass
class Table:
    """A table's rows: `paths` joined to its folder, `labels` a tuple of class names each
    (one name unless multi-label), `is_val` one bool each (None: hold out by seed),
    `root` the folder the paths are in."""
    paths: list
    labels: list
    is_val: object
    root: str
    source: str  # the file, or "the DataFrame", for messages


def is_table(dataset):
    """Whether `dataset` names a table file (.csv or .tsv)."""
    return str(dataset).lower().endswith(EXTENSIONS)


def settings(path_column=None, label_column=None, split_column="split",
             label_delimiter="auto"):
    """config.table's settings for a table read from Python (`data.from_dataframe`)."""
    return SimpleNamespace(path_column=path_column or "", label_column=label_column or "",
                           split_column=split_column or "", label_delimiter=label_delimiter)


def check_settings(table):
    """A one-line `ValueError` for `config.table` settings that cannot be read."""
    delimiter = table.label_delimiter
    if delimiter not in ("auto", "none") and len(delimiter) != 1:
        raise ValueError(f"table.label_delimiter must be auto, none or one character, "
                         f"got {delimiter!r}")


def read_file(path, settings, multi_label=False):
    """The `Table` in the CSV or TSV file at `path` (`settings`: config.table);
    `multi_label`: a cell holds several labels (task=multi_label)."""
    if not os.path.isfile(path):
        raise ValueError(f"label table {path!r} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            numbered = [(reader.line_num, row) for row in reader
                        if any(cell.strip() for cell in row)]  # blank lines skipped
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read label table {path!r}: {e}") from None
    lines, rows = [n for n, _ in numbered], [row for _, row in numbered]
    if len(rows) < 2:
        raise ValueError(f"label table {path!r}: needs a header row and at least one row of "
                         f"an image and its label; it has {len(rows)} row{'s' if len(rows) != 1 else ''}")
    header, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
    short = [n for n, row in zip(lines, rows) if len(row) < len(header)]
    if short:
        raise ValueError(f"label table {path!r}: line {short[0]} has fewer cells than the "
                         f"header's {len(header)} ({len(short)} in all)")
    columns = {name: [row[i].strip() for row in rows] for i, name in enumerate(header)}
    return from_columns(columns, settings, root=os.path.dirname(os.path.abspath(path)),
                        source=repr(path), lines=lines, multi_label=multi_label)


def from_columns(columns, settings, root, source="the DataFrame", lines=None,
                 multi_label=False):
    """The `Table` of `columns` ({name: cells}, in the table's order): `settings` names
    the columns (config.table); relative paths are joined to `root`; `lines`: each
    row's line in the file (for messages; None: rows are counted from 0);
    `multi_label`: each label cell is split into its labels."""
    where = (lambda i: f"line {lines[i]}") if lines else (lambda i: f"row {i}")
    names = _names(columns, source)
    path_column = _column(settings.path_column or names[0], names, source, "path_column")
    label_column = _column(settings.label_column or names[1], names, source, "label_column")
    paths = [str(p) for p in columns[path_column]]
    cells = [str(c) for c in columns[label_column]]
    _refuse_empty(paths, path_column, source, where)
    _refuse_empty(cells, label_column, source, where)
    if multi_label:
        labels = _split_labels(cells, settings.label_delimiter)
    else:
        _refuse_several_labels(cells, settings.label_delimiter, source, where)
        labels = [(cell,) for cell in cells]
    paths = [_joined(p, root, source) for p in paths]
    first = {}
    for i, path in enumerate(paths):
        if first.setdefault(path, i) != i:
            raise ValueError(f"label table {source}: image {path!r} is listed twice "
                             f"({where(first[path])} and {where(i)}); list each image once")
    is_val = None
    if settings.split_column in columns:
        is_val = _is_val(columns[settings.split_column], settings.split_column, source,
                         where)
        only_val = sorted({c for row, v in zip(labels, is_val) if v for c in row}
                          - {c for row, v in zip(labels, is_val) if not v for c in row})
        if only_val:
            raise ValueError(f"label table {source}: labels seen only in validation rows, "
                             f"never in training: {', '.join(map(repr, only_val))}")
    return Table(paths, labels, is_val, root, source)


def _names(columns, source):
    names = list(columns)
    if len(names) < 2:
        raise ValueError(f"label table {source}: needs a path column and a label column; "
                         f"found the columns {names}")
    return names


def _column(name, names, source, key):
    if name not in names:
        raise ValueError(f"label table {source}: no column {name!r} (table.{key}); "
                         f"its columns: {', '.join(names)}")
    return name


def _refuse_empty(cells, column, source, where):
    empty = [i for i, c in enumerate(cells) if not c.strip() or c == "nan"]
    if empty:
        raise ValueError(f"label table {source}: an empty {column!r} cell at "
                         f"{where(empty[0])} ({len(empty)} in all)")


def _delimiter(cells, delimiter):
    """The delimiter that splits `cells`: `delimiter` itself, or with "auto" the first of
    DELIMITERS that a cell holds; None: every cell is one label."""
    if delimiter == "none":
        return None
    found = [d for d in (DELIMITERS if delimiter == "auto" else (delimiter,))
             if any(d in c for c in cells)]
    return found[0] if found else None


def _split_labels(cells, delimiter):
    """Each cell's labels, sorted, each once."""
    delimiter = _delimiter(cells, delimiter)
    return [tuple(sorted({label.strip() for label in cell.split(delimiter) if label.strip()}))
            if delimiter else (cell,) for cell in cells]


def _refuse_several_labels(cells, delimiter, source, where):
    """Several labels in a cell of a single-label table: refused, naming the delimiter;
    `none` keeps each cell whole, one label."""
    found = _delimiter(cells, delimiter)
    if found:
        several = [i for i, c in enumerate(cells) if found in c]
        raise ValueError(
            f"label table {source}: several labels separated by {found!r} in a cell "
            f"({cells[several[0]]!r} at {where(several[0])}; {len(several)} in all); several "
            "labels per image need --config.task=multi_label; if each cell is one label, "
            "set table.label_delimiter=none")


def _joined(path, root, source):
    joined = os.path.normpath(os.path.join(root, path))
    if not os.path.isabs(path) and os.path.commonpath([joined, root]) != root:
        raise ValueError(f"label table {source}: image path {path!r} leaves the table's "
                         f"folder {root!r}; give it from inside the folder, or absolute")
    return joined


def _is_val(cells, column, source, where):
    words = [str(c).strip().lower() for c in cells]
    unknown = [i for i, w in enumerate(words) if w not in SPLITS]
    if unknown:
        raise ValueError(f"label table {source}: split column {column!r} holds "
                         f"{cells[unknown[0]]!r} at {where(unknown[0])}; "
                         "valid: train, valid (val, validation)")
    return [SPLITS[w] for w in words]


def is_dataframe(value):
    """Whether `value` is a pandas DataFrame (or another table with `columns`)."""
    return hasattr(value, "columns") and hasattr(value, "__getitem__")


def saved_dataframe(df, path_column=""):
    """`df` (image paths and labels) as a CSV file a run's config names, so the run
    resumes and reads as any other: `$TL_KERAS_CACHE/tables/<digest of its rows>.csv`,
    relative paths made absolute from the working folder, written once per content."""
    columns = {str(name): [str(cell) for cell in df[name]] for name in df.columns}
    names = _names(columns, "the DataFrame")
    column = _column(path_column or names[0], names, "the DataFrame", "path_column")
    columns[column] = [os.path.abspath(p) if p.strip() else p for p in columns[column]]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(names)
    writer.writerows(zip(*columns.values()))
    digest = hashlib.sha1(text.getvalue().encode()).hexdigest()[:16]
    path = run_folder.cache_path("tables", f"{digest}.csv")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        run_folder.write_text(path, text.getvalue())
    return path
