"""Reading medical image collections into one SampleTable, decoding images, splitting, checking."""
