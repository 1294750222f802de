"""The offline testbed: a real pretrained encoder, generated images with known evidence, a small trained VLM."""
