/* stats: being written (placeholder so the build lists it). */
