"""YOLOv5 network code of the suite (written here from the published architecture; no ultralytics import)."""
