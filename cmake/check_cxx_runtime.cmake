# Run after linking specops._C (CMakeLists.txt): warns loudly when the module carries a C++
# runtime of its own (libstdc++ linked statically, e.g. by a toolchain whose libstdc++.so link
# is missing, so that the linker falls back to libstdc++.a without a word). torch has loaded the
# shared libstdc++.so.6 by then, and two copies of the iostream/locale machinery in one process
# break formatting numbers into an error message (c10::str -> ostream << int64): the facet
# lookup finds the wrong slot; GCC 12's has_facet catches that with a dynamic_cast and the message
# is cut at its first number; a libstdc++ that returns standard facets with a static_cast would
# call through the wrong facet instead (the likely cause, not confirmed, of the segmentation
# faults of the 2026-11-27 GPU run: GCC 13 at /opt/gcc there).
# Usage: cmake -DNM=<nm> -DMODULE=<path to _C*.so> -P check_cxx_runtime.cmake
execute_process(COMMAND "${NM}" -D --defined-only "${MODULE}"
                OUTPUT_VARIABLE symbols RESULT_VARIABLE rc ERROR_QUIET)
if(NOT rc EQUAL 0)
  message(WARNING "could not list the dynamic symbols of ${MODULE} with ${NM}: "
                  "the one-C++-runtime check is skipped")
  return()
endif()
if(symbols MATCHES "[ \t](__cxa_throw|__gxx_personality_v0|_ZNSt6locale2id5_M_idEv)\n")
  # A warning, not an error: such a module still runs every kernel (a benchmark run on a
  # machine with only this toolchain keeps its GPU work); its bad-input errors are what break.
  message(WARNING
    "${MODULE} defines ${CMAKE_MATCH_1}: the C++ runtime (libstdc++) was linked into it "
    "statically, so the process will hold two of them (torch uses the shared "
    "libstdc++.so.6), and errors raised by the C++ kernels may come out cut short or crash "
    "the process. Build with a compiler whose shared libstdc++ is installed: "
    "`<compiler> -print-file-name=libstdc++.so` must name an existing file; the CXX "
    "environment variable picks the compiler (remove the build folder first).")
endif()
