"""Checks on what reaches `DeepSeekModel.forward`, so that bad inputs fail with a message instead of deep inside
attention: an empty sequence, a prompt longer than `max_position_embeddings`, token ids outside the vocabulary.

Only shapes are checked on accelerators (reading token values there would synchronise every decode step); token
values are checked where they already live on the CPU, and never while `torch.compile` or `torch.export` traces
the model (a value read there is a data-dependent guard: a graph break, or an export error).
"""

import torch


def tracing() -> bool:
    """True while torch.compile (Dynamo) or torch.export traces the code that calls it."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def check_model_inputs(
    config,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past: int,
) -> None:
    """Raise `ValueError` naming the input and the limit it breaks; `past` is the number of cached positions.
    With `position_ids` (packed documents, left padding) the largest position counts, not the row length."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    length = tokens.shape[1] if tokens.dim() > 1 else 0
    if length == 0:
        raise ValueError(
            f"The input has no tokens (shape {list(tokens.shape)}); pass at least one token, e.g. the BOS token "
            f"(id {config.bos_token_id})."
        )
    read_values = not tracing()
    if position_ids is not None:
        on_host = read_values and position_ids.device.type == "cpu" and position_ids.numel()
        length = int(position_ids.max()) + 1 if on_host else 0
    if past == 0 and length > config.max_position_embeddings:
        raise ValueError(
            f"The prompt has {length} tokens but the model's context is max_position_embeddings="
            f"{config.max_position_embeddings}; shorten or truncate the prompt "
            f"(tokenizer(..., truncation=True, max_length={config.max_position_embeddings}))."
        )
    if read_values and input_ids is not None and input_ids.device.type == "cpu" and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"Token id {bad} in input_ids is outside the vocabulary [0, {config.vocab_size}); the tokenizer "
                "does not match the model, or ids were corrupted."
            )
