"""Drives `ragtune serve` with the official `openai` Python client (pinned in
tests/serve/requirements.txt). Run by tests/it/serve.rs:

    python3 openai_client.py BASE_URL API_KEY

Prints one JSON object: the streamed and non-streamed text of every mode, the embeddings, and
the status of each error case; exits non-zero when a check fails.
"""

import json
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
question = "What is the SPDX identifier of the Apache License 2.0?"
out = {"modes": {}, "errors": {}}

for mode in ["hybrid", "rag", "finetune", "base"]:
    messages = [{"role": "user", "content": question}]
    full = client.chat.completions.create(
        model=mode, messages=messages, max_tokens=24, temperature=0
    )
    text = full.choices[0].message.content
    ext = full.model_extra["ragtune"]
    pieces, last = [], None
    for chunk in client.chat.completions.create(
        model=mode, messages=messages, max_tokens=24, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        last = chunk
    streamed = "".join(pieces)
    assert streamed == text, (mode, streamed, text)
    assert last.choices[0].finish_reason in ("stop", "length"), last
    last_ext = last.model_extra["ragtune"]
    assert last_ext["sources"] == ext["sources"], mode
    assert full.usage.completion_tokens > 0, full.usage
    out["modes"][mode] = {
        "text": text,
        "sources": [s["doc_id"] for s in ext["sources"]],
        "adapter": ext["adapter"],
        "prompt_tokens": full.usage.prompt_tokens,
    }

# Embeddings: the client asks for base64 by default and decodes it; ask for floats too.
for fmt in ["base64", "float"]:
    kwargs = {} if fmt == "base64" else {"encoding_format": "float"}
    e = client.embeddings.create(model="minilm", input=["MIT License", "GPL"], **kwargs)
    out["embeddings_" + fmt] = [d.embedding for d in e.data]


def status(call):
    try:
        call()
    except openai.APIStatusError as e:
        return e.status_code
    return 200


ask = lambda **kw: client.chat.completions.create(
    **{"model": "rag", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **kw}
)
out["errors"]["unknown_model"] = status(lambda: ask(model="gpt-4"))
out["errors"]["n_2"] = status(lambda: ask(n=2))
out["errors"]["too_long"] = status(
    lambda: ask(messages=[{"role": "user", "content": "word " * 3000}])
)
out["errors"]["last_not_user"] = status(
    lambda: ask(messages=[{"role": "assistant", "content": "hi"}])
)
wrong_key = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
out["errors"]["wrong_key"] = status(
    lambda: wrong_key.chat.completions.create(
        model="rag", messages=[{"role": "user", "content": "x"}], max_tokens=4
    )
)
out["models"] = sorted(m.id for m in client.models.list())
print(json.dumps(out))
