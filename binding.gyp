{
  "targets": [
    {
      "target_name": "strata_native",
      "sources": ["native/strata_native.cc", "native/ublk.cc"],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      "defines": [
        "NAPI_VERSION=8",
        # A worker terminated (or the process exiting) while one of its
        # threads is inside a native call makes napi_throw fail; without
        # this the C++ exception escapes and aborts the process.
        "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS",
        # liburing < 2.4 has no IO_URING_VERSION_* macros; used only by info().
        "STRATA_LIBURING_VERSION=\"<!(pkg-config --modversion liburing 2>/dev/null || echo unknown)\""
      ],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra"],
      "libraries": ["-luring"]
    }
  ]
}
