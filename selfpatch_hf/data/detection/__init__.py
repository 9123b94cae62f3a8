"""Detection and instance-segmentation data: COCO-layout sources (Hub datasets, COCO json), checked instances, joint
augmentation of image, boxes and masks, and batches in the detectors' label formats."""
