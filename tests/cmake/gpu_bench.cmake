# GPU benchmark executables (not ctest tests): built only with CUDA. They link only the CUDA
# kernels library, so they build on a machine that has just a CUDA toolkit and CMake.
if(DMSRT_HAVE_CUDA)
  file(GLOB GPU_BENCH_SRC CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/bench/gpu_*.cc
                                            ${CMAKE_CURRENT_SOURCE_DIR}/bench/gpu_*.cu)
  foreach(src ${GPU_BENCH_SRC})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE dmsrt_kernels_cuda dmsrt_kernels)
    set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
  endforeach()
endif()
