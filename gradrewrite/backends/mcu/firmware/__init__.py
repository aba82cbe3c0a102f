"""Building and running a generated project: ``build.py`` makes the host executable
and the Cortex-M images (arm-none-eabi-gcc, within the RAM/flash budget) from
``templates/``; ``qemu.py`` runs the images under qemu-system-arm and measures them
(stack high-water mark, exact instruction counts). Inference and training images
alike."""
