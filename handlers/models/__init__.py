"""Model builders and adapters: architectures, CLIP, YOLO, torchvision R-CNN heads."""
