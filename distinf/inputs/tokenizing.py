"""Tokenising checked tables: truncation without encoding a long text whole, loss masks over the
completion or the assistant turns of a chat (rendered with the tokenizer's template), and the
rows that tokenisation itself finds bad."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from distinf.inputs.checks import DataError, Rejection, all_rejected
from distinf.token_rows import TokenRows, TokenRowsBuilder


@dataclass
class Tokenized:
    """One tokenised dataset: `examples[i]` belongs to `ids[i]`."""

    examples: TokenRows
    """Example i is a dict of input_ids [T] and attention_mask [T] (int64, T <= max_length, no
    padding); for sequence_classification also labels [] (int64); for a masked causal_lm
    (prompt/completion or messages columns) also labels [T]: input_ids with -100 at every token
    that carries no loss. Held flat (`TokenRows`), about 4 bytes a token."""
    ids: list[str]
    truncated: int
    """How many examples were cut to max_length."""
    rows: list[int] = field(default_factory=list)
    """The row in its file of each example."""
    rejected: list[Rejection] = field(default_factory=list)
    """Rows left out under on_bad_row="skip", by `read_dataset` and by `tokenize`."""
    files: list[str | None] = field(default_factory=list)
    """The file of each example, when the dataset has several (else empty)."""


_TOKENIZE_CHUNK = 1024


def tokenize(table: pa.Table | Iterable[pa.Table], tokenizer: Any, max_length: int, task: str, *,
             num_labels: int | None = None, add_special_tokens: bool = True,
             role: str = "train", on_bad_row: str = "error") -> Tokenized:
    """Tokenise `table` (from `read_table` or `read_dataset`), or the tables of `read_files` one
    after another as they are read, into one dict of 1-D int64 tensors per example.

    Sequences longer than `max_length` are truncated the way the tokenizer truncates (its
    `truncation_side`, special tokens kept) and counted in `Tokenized.truncated`. For
    `sequence_classification` each example also gets a 0-d `labels` from the table's `label`
    column, checked against `num_labels`. For `causal_lm` there is no labels key (the loss
    predicts input_ids[1:]), so every example needs at least 2 tokens.

    Loss masking (causal_lm): a table with `prompt` and `completion` columns is tokenised as the
    text prompt + completion, and `labels` keeps only the tokens that cover completion
    characters (a token straddling the boundary counts as completion; special tokens the
    tokenizer adds count as completion after the first completion token, as prompt before). A
    table with `messages` is rendered with the tokenizer's chat template (no special tokens
    added: the template writes them) and `labels` keeps the tokens of each assistant turn, as
    the template writes it after the generation prompt (content and end-of-turn). The loss is
    the mean over the kept tokens that have a token before them. An example truncated so far
    that no such token is left is a bad row.

    Errors name the table's `row` column (and `file`) when it has one; with on_bad_row="skip"
    a failing example is left out and listed in `Tokenized.rejected` instead. No table, or only
    empty ones, give an empty Tokenized; rows that are all rejected raise.
    """
    key = f"data.{role}"
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"task must be 'causal_lm' or 'sequence_classification', not {task!r}")
    if task == "causal_lm" and max_length < 2:
        raise DataError(f"data.max_length: {max_length} leaves causal_lm nothing to predict; "
                        "use at least 2")
    out, rows_out = Tokenized(examples=TokenRows.empty(), ids=[], truncated=0), TokenRowsBuilder()
    for piece in [table] if isinstance(table, pa.Table) else table:
        _tokenize_table(piece, tokenizer, max_length, task, num_labels, add_special_tokens, key, on_bad_row,
                        out, rows_out)
    out.examples = rows_out.build()
    if not out.ids and out.rejected:
        raise all_rejected(key, out.rejected)
    return out


def _tokenize_table(table: pa.Table, tokenizer: Any, max_length: int, task: str, num_labels: int | None,
                    add_special_tokens: bool, key: str, on_bad_row: str, out: Tokenized,
                    rows_out: TokenRowsBuilder) -> None:
    """`tokenize` of one table, its examples added to `rows_out` and its ids, rows, files,
    rejections and truncations to `out`."""
    mode = "messages" if "messages" in table.column_names else \
        "completion" if "completion" in table.column_names else "text"
    if mode != "text":
        option = f"{key}.{'messages' if mode == 'messages' else 'prompt'}_column"
        if task != "causal_lm":
            raise DataError(f"{option}: loss masking is for causal_lm, not {task}")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{option}: needs a fast tokenizer (tokenizer.json) to tell the masked tokens "
                            "apart by character offsets; the tokenizer of model.path is a slow one")
        if mode == "messages" and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{option}: the tokenizer of model.path has no chat template to render the "
                            "messages with")
    ids = table.column("example_id").to_pylist()
    texts = table.column("text").to_pylist()
    rows = table.column("row").to_pylist() if "row" in table.column_names else list(range(len(ids)))
    files = table.column("file").to_pylist() if "file" in table.column_names else None
    labels = None
    if task == "sequence_classification":
        if "label" not in table.column_names:
            raise DataError(f"{key}.label_column: sequence_classification needs a label column")
        if num_labels is None:
            raise ValueError("tokenize: sequence_classification needs num_labels")
        labels = table.column("label").to_pylist()

    def where(i: int) -> str:
        return f"{key}: '{files[i]}' row {rows[i]}" if files else f"{key} row {rows[i]}"

    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        spans: list[list[tuple[int, int]] | str] | None = None
        if mode == "completion":
            prompts = table.column("prompt").slice(start, _TOKENIZE_CHUNK).to_pylist()
            spans = [[(len(p), len(t))] for p, t in zip(prompts, texts[start:stop])]
        elif mode == "messages":
            rendered = [_render_chat(tokenizer, m) for m in table.column("messages").slice(
                start, _TOKENIZE_CHUNK).to_pylist()]
            texts[start:stop] = [r[0] if isinstance(r, tuple) else "" for r in rendered]
            spans = [r[1] if isinstance(r, tuple) else r for r in rendered]
        encoded = encode(tokenizer, texts[start:stop], max_length,
                          add_special_tokens and mode != "messages", offsets=mode != "text")
        for offset, (input_ids, _, cut, token_spans) in enumerate(encoded):
            i = start + offset
            loss_mask = label = problem = None
            if spans is not None and isinstance(spans[offset], str):
                problem = spans[offset]  # the chat template could not render the row
            elif task == "causal_lm" and len(input_ids) < 2:
                problem = (f"{len(input_ids)} token(s) after tokenisation; causal_lm needs at "
                           "least 2 (one to predict)")
            elif spans is not None:
                keep = _loss_tokens(token_spans, spans[offset], mode)
                predicted = sum(keep[1:])
                if predicted == 0:
                    what = "completion" if mode == "completion" else "assistant turns"
                    problem = (f"no token of the {what} is left to carry the loss: cut away by "
                               f"data.max_length ({max_length} tokens)" if cut else
                               f"the {what} has no token with a token before it to predict it from")
                else:
                    loss_mask = keep
            elif labels is not None:
                label = labels[i]
                if label is None:
                    problem = "the label is missing"
                elif not 0 <= label < num_labels:
                    problem = (f"label {label} is outside 0..{num_labels - 1} (the model has "
                               f"{num_labels} labels)")
            if problem is not None:
                if on_bad_row != "skip":
                    raise DataError(f"{where(i)} (id '{ids[i]}'): {problem}")
                file = files[i] if files else None
                out.rejected.append(Rejection(rows[i], ids[i], f"in '{file}': {problem}" if file else problem,
                                              file))
                continue
            rows_out.add(input_ids, loss_mask, label)
            out.ids.append(ids[i])
            out.rows.append(rows[i])
            if files:
                out.files.append(files[i])
            out.truncated += cut


def _render_chat(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | str:
    """(the conversation as the chat template renders it, the character spans of its assistant
    turns), or the reason it cannot be rendered turn by turn.

    An assistant turn j spans from the end of messages[:j] rendered with the generation prompt
    to the end of messages[:j+1]; each rendering must be a prefix of the whole, or the turns
    cannot be told apart.
    """
    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        whole = render(messages, False)
        spans = []
        for j, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = render(messages[:j], True) if j else ""
            through = render(messages[: j + 1], False)
            if not (whole.startswith(through) and through.startswith(before)):
                return (f"the chat template does not render the conversation turn by turn (turn {j} renders "
                        "differently within the whole), so its assistant tokens cannot be told apart")
            if turn["content"].strip():
                spans.append((len(before), len(through)))
    except Exception as error:  # noqa: BLE001 - a template raises what it likes (jinja2, ValueError)
        return f"the chat template could not render the messages: {error}"
    return whole, spans


def _loss_tokens(token_spans: list[tuple[int, int]], spans: list[tuple[int, int]], mode: str) -> list[bool]:
    """Which tokens carry the loss: those overlapping a span of characters (a completion, an
    assistant turn). A zero-width token (a special token the tokenizer added) carries it after a
    completion began (an EOS), not before (a BOS)."""
    keep, begun = [], False
    for start, end in token_spans:
        if start == end:
            keep.append(begun if mode == "completion" else False)
            continue
        hit = any(start < stop and end > first for first, stop in spans)
        begun = begun or hit
        keep.append(hit)
    return keep


CHARS_PER_TOKEN = 32
"""A text is tokenised from at most this many characters per token of max_length (from its kept
side), doubled while that part gives too few tokens: a token of ordinary text spans a few
characters, and a fast tokenizer encodes the whole string before it truncates."""


def _kept_part(text: str, budget: int, side: str) -> tuple[str, int]:
    """(the part of `text` to tokenise, where it starts in `text`): the whole of a short text, else
    about `budget` characters from the kept side, cut at whitespace when there is some near the
    cut, so that no word is split (the tokens before the cut are then those of the whole text)."""
    if len(text) <= budget:
        return text, 0
    if side == "left":
        start = len(text) - budget
        for i in range(start, start + budget // 2):  # keep the whitespace: it belongs to the next word
            if text[i].isspace():
                return text[i:], i
        return text[start:], start
    for i in range(budget, budget // 2, -1):
        if text[i].isspace():
            return text[:i], 0
    return text[:budget], 0


def encode(tokenizer: Any, texts: list[str], max_length: int, add_special_tokens: bool,
           offsets: bool = False) -> list[tuple[list[int], list[int], bool, list | None]]:
    """(input_ids, attention_mask, truncated, character offsets in the whole text or None) per
    text, without ever encoding a text in full.

    A fast tokenizer encodes the whole string before it truncates, so a long text is first cut to
    `CHARS_PER_TOKEN` characters a token from its kept side (`tokenizer.truncation_side`), and
    the cut doubled while the part gives at most max_length tokens. Encoding to max_length + 1
    then returns every short text exactly; a result of max_length + 1 tokens means the text did
    not fit, and only those are encoded again to max_length.
    """
    side = getattr(tokenizer, "truncation_side", "right")

    def run(batch: list[str], limit: int) -> tuple[list[list[int]], list[list[int]], list | None]:
        out = tokenizer(batch, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=limit, padding=False, return_attention_mask=True,
                        return_token_type_ids=False, return_offsets_mapping=offsets)
        spans = [[tuple(span) for span in seq] for seq in out["offset_mapping"]] if offsets else None
        return out["input_ids"], out["attention_mask"], spans

    budget = CHARS_PER_TOKEN * (max_length + 2)
    parts = [_kept_part(text, budget, side) for text in texts]
    input_ids, masks, spans = run([part for part, _ in parts], max_length + 1)
    short_cut = [i for i, seq in enumerate(input_ids) if len(seq) <= max_length and len(parts[i][0]) < len(texts[i])]
    while short_cut:  # cut too short to fill max_length (long runs of whitespace, long tokens): cut longer
        budget *= 2
        for i in short_cut:
            parts[i] = _kept_part(texts[i], budget, side)
        again_ids, again_masks, again_spans = run([parts[i][0] for i in short_cut], max_length + 1)
        for j, i in enumerate(short_cut):
            input_ids[i], masks[i] = again_ids[j], again_masks[j]
            if offsets:
                spans[i] = again_spans[j]
        short_cut = [i for i in short_cut if len(input_ids[i]) <= max_length and len(parts[i][0]) < len(texts[i])]
    long = [i for i, seq in enumerate(input_ids) if len(seq) > max_length]
    if long:
        cut_ids, cut_masks, cut_spans = run([parts[i][0] for i in long], max_length)
        for j, (i, seq, mask) in enumerate(zip(long, cut_ids, cut_masks)):
            input_ids[i], masks[i] = seq, mask
            if offsets:
                spans[i] = cut_spans[j]
    if offsets:  # offsets into the whole text, where the part began later in it
        spans = [[(a + parts[i][1], b + parts[i][1]) if parts[i][1] and b > a else (a, b) for a, b in seq]
                 for i, seq in enumerate(spans)]
    cut = set(long)
    return [(ids, mask, i in cut, spans[i] if offsets else None)
            for i, (ids, mask) in enumerate(zip(input_ids, masks))]
