"""K agents on one stacked axis (``agent_axis``), on a device mesh (``sharding``), on disk
(``checkpoint``, ``pretrained``), asked sparsely (``dispatch``), and what a run's config
resolves into (``runs``)."""
