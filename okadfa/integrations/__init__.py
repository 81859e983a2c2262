"""Optional integrations of okadfa with other libraries.

Each submodule imports its library only when it is itself imported, so `import okadfa`
never pulls them in:

    okadfa.integrations.transformers   FAVOR+ as a Hugging Face attention implementation
                                       (extra `hf`: pip install okadfa[hf])

`_autoregister` registers that attention implementation when transformers' model code is
imported, so `attn_implementation="okadfa_favor"` works without a call.
"""
