"""SafeSpace web app (also the Hugging Face Space entry point): `python app.py`.

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860; a Space
sets 0.0.0.0).
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU wants `spaces` imported before anything touches CUDA; elsewhere it is optional
    import spaces  # noqa: F401
except ImportError:
    pass

from safespace.ui import build_app, launch_kwargs

demo = build_app()

if __name__ == "__main__":
    from safespace import align

    align.warm_up_in_background()   # the default base is built once; visitors' jobs wait on the lock
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                **launch_kwargs())
