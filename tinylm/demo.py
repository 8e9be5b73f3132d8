"""`tinylm demo`: a Gradio page on localhost to type a prompt and watch the model write.

Gradio is an optional extra (`pip install 'tinylm[demo]'`), imported only when
the demo starts, so this module loads without it. The page streams the text in
as it is sampled, with the same sampler as `tinylm generate`.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import paths, sampler, startup
from .config import DEVICES
from .errors import UserError, run_cli
from .generate import add_model_arguments, load_chosen_model

# The page starts with `tinylm generate`'s defaults: both take them from config.Sampling.
DEFAULT_SAMPLING = sampler.Sampling()
DEFAULT_SEED = 1337
MAX_NEW_TOKENS = 2000
INSTALL_HINT = "pip install 'tinylm[demo]'"


def import_gradio():
    """Import Gradio with its telemetry and update check off, or explain how to install it."""
    # Read by gradio at import and at Blocks(): no usage reports, no version check.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise UserError(f"the demo needs Gradio, which is not installed: {INSTALL_HINT}") from None
    return gradio


def build_app(gr, model, tokenizer, title: str):
    """The Blocks page: prompt, sampling controls, a Generate button and the streamed text."""
    vocab_size = len(tokenizer)
    block_size = sampler.context_length(model)

    def write(prompt, temperature, top_k, top_p, max_new_tokens, seed):
        """Yield the prompt plus the text so far after every decoded piece (Gradio streams each yield)."""
        sampling = sampler.Sampling(int(max_new_tokens), float(temperature), int(top_k), float(top_p))
        try:
            sampling.check()
            prompt_ids = sampler.model_prompt_ids(model, tokenizer, prompt)
        except UserError as exc:  # the user's to fix: a message on the page, no traceback in the console
            raise gr.Error(str(exc), print_exception=False) from None
        if len(prompt_ids) > block_size:
            gr.Warning(f"The prompt is {len(prompt_ids)} tokens; the model sees only the last {block_size}.")
        generator = sampler.make_generator(model.device, DEFAULT_SEED if seed is None else int(seed))
        text = prompt
        for piece in sampler.decode_stream(tokenizer, sampler.sample_tokens(model, prompt_ids, sampling, generator)):
            text += piece
            yield text

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {title}\n"
            f"A GPT-2 with a context of {block_size} tokens and a vocabulary of {vocab_size}. "
            "It keeps writing past its context: the window slides."
        )
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="empty: start from <|endoftext|>", elem_id="prompt")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=DEFAULT_SAMPLING.temperature, step=0.05,
                                    label="Temperature (0 = greedy)", elem_id="temperature")
            # Up to the vocabulary, or to the default when that is larger: any k from the
            # vocabulary size up keeps every token, as it does for `tinylm generate`.
            top_k = gr.Slider(0, max(vocab_size, DEFAULT_SAMPLING.top_k), value=DEFAULT_SAMPLING.top_k, step=1,
                              label="Top-k (0 = off)", elem_id="top-k")
            top_p = gr.Slider(0.05, 1.0, value=DEFAULT_SAMPLING.top_p, step=0.05,
                              label="Top-p (1 = off)", elem_id="top-p")
        with gr.Row():
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_SAMPLING.max_new_tokens, step=1,
                                       label="New tokens", elem_id="max-new-tokens")
            seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed (same seed, same text)", elem_id="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        output = gr.Textbox(label="Text", lines=14, interactive=False, elem_id="output")
        button.click(write, [prompt, temperature, top_k, top_p, max_new_tokens, seed], output)
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tinylm demo",
        description=f"Serve a browser page to sample from a checkpoint (needs Gradio: {INSTALL_HINT}).",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 lets other machines connect (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run the model (default: auto)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    gr = import_gradio()
    model, tokenizer = load_chosen_model(args, sampler.pick_device(args.device))
    app = build_app(gr, model, tokenizer, title=f"tinylm: {args.model or args.checkpoint or paths.CHECKPOINT_BEST}")
    try:
        # quiet: Gradio's own banner suggests share=True, a public tunnel we never open.
        app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                   quiet=True, prevent_thread_lock=True)
    except OSError:  # gradio's own message speaks of launch() arguments, not of our flags
        raise UserError(
            f"cannot serve on {args.host}:{args.port}: the port is in use or the address is not this machine's; "
            "pick another --port (or --host)"
        ) from None
    print(f"serving the demo on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    app.block_thread()
    return 0


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
