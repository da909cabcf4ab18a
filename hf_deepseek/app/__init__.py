"""Gradio chat demo: `hf-deepseek chat --model DIR` or `make chat`.

Telemetry is off unless the environment turns it on: these defaults are set before Gradio is imported.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from hf_deepseek.app.chat import (  # noqa: E402
    ChatLimits,
    ChatResponder,
    build_chat_app,
    launch_chat,
    load_chat_model,
    run_chat_from_args,
)

__all__ = ["ChatLimits", "ChatResponder", "build_chat_app", "launch_chat", "load_chat_model", "run_chat_from_args"]
