"""Policy bundles shipped with hpo-meta (package data); ``"default"`` is what ``from_pretrained("default")`` loads."""
