"""Offramp's OpenAI-compatible gateway: ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` in front of the Triton model ``offramp``, forwarded over gRPC streaming.

A separate package so that the engine (``offramp``) never imports a web framework: the gateway
holds no engine logic. It translates OpenAI request bodies into the model's vLLM-style tensors
(``text_input``, ``stream``, ``sampling_parameters``, ``exclude_input_in_output``), and the
model's outputs (``text_output``, ``finish_reason``, ``num_input_tokens``, ``num_output_tokens``,
``exit_layers``) back into OpenAI responses. ``offramp serve --openai-port`` starts it.
"""

__version__ = "0.1.0"
