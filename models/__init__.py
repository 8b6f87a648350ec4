"""Model wrappers (OCR, CLIP): load once, run on batches; stages call them and write columns."""
