"""The embedded tiny text-to-image world: procedural captioned scenes, a programmatic captioner
(the world's reward model) and a CLIP-format tokenizer built from the world's words."""
