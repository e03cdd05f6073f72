"""ROS 2 layer of nchunk: VQA node, image conversion, /ask client, demo camera."""
