"""The OpenAI-compatible HTTP server: `create_app(llm)` builds the Starlette app."""


def __getattr__(name):  # keep `import jaxllm.serving` light: the CLI imports it before any model is needed
    if name == "create_app":
        from jaxllm.serving.app import create_app

        return create_app
    raise AttributeError(name)


__all__ = ["create_app"]
