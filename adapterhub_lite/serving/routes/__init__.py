"""The server's HTTP routes, one FastAPI APIRouter per module (as vLLM's entrypoints); serving/api.py includes them.

    common.py     what the routes share: the served objects on app.state, the JSON body reader, the runtime-loading check
    openai.py     the OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/classify
    tokenizer.py  /tokenize, /detokenize, /tokenizer_info
    admin.py      /health, /version, /metrics; adapters at run time: /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/reload
"""
