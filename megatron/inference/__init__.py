"""Text-generation servers over ``megatron.core.inference`` (the application side).

- ``server_args``: the flags of ``tools/run_text_generation_server.py``;
- ``text_service``: tokenizer + engine + the lock that serializes requests;
- ``rank_roles``: rank 0 serves HTTP, the other ranks follow its broadcasts;
- ``megatron_api``: Megatron's ``PUT /api`` and ``POST /completions`` request rules and replies;
- ``openai_api``: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``;
- ``streaming``: server-sent events of a generation in progress;
- ``app``: the FastAPI application with every route;
- ``model_loading``: the model of this rank from the command line and ``--load``.
"""
