"""Blocks and their paged K/V split over several devices (``--devices``) or processes
(``--pipeline-stages``, on torch.distributed): placement, stages, transport, the stage process."""
