"""Optional integrations of okadfa with other libraries.

Each submodule imports its library only when it is itself imported, so `import okadfa`
never pulls them in:

    okadfa.integrations.transformers   FAVOR+ as a Hugging Face attention implementation
                                       (extra `hf`: pip install okadfa[hf])
"""
