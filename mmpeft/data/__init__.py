"""Readers for the data formats users have: COCO, LLaVA JSON, webdataset shards, VIST."""
