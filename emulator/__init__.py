"""What stands in for hardware: emulated meters, PLC channels, the QEMU ARM target."""
