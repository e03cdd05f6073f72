"""nchunk core: flash-resident VLM weights streamed with Neuron Chunking (no ROS imports)."""
