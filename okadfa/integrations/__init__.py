"""Optional integrations of okadfa with other libraries.

Each submodule imports its library only when it is itself imported, so `import okadfa`
never pulls them in (extra `hf`: pip install okadfa[hf]):

    okadfa.integrations.transformers         FAVOR+ as a Hugging Face attention implementation
    okadfa.integrations.transformers_config  the OKADFA model's config as a PretrainedConfig
    okadfa.integrations.transformers_model   the OKADFA model as a PreTrainedModel

`_autoregister` registers the attention implementation and the model type when transformers
imports the modules that read them, so `attn_implementation="okadfa_favor"` and
`AutoModelForCausalLM.from_pretrained(saved_okadfa_dir)` work without a call.
"""
